"""Algorithms: what to compute, never where. Importing this package registers the built-ins."""

from swiftray.algorithms.base import ALGORITHMS, Algorithm, get_algorithm, register_algorithm
from swiftray.algorithms.gkd import GKD
from swiftray.algorithms.grpo import DAPO, GRPO
from swiftray.algorithms.ppo import PPO
from swiftray.algorithms.sft import SFT

__all__ = ["ALGORITHMS", "DAPO", "GKD", "GRPO", "PPO", "SFT", "Algorithm", "get_algorithm", "register_algorithm"]
