"""Algorithms: what to compute, never where. Importing this package registers the built-ins."""

from swiftray.algorithms.base import ALGORITHMS, Algorithm, get_algorithm, register_algorithm
from swiftray.algorithms.cpo import CPO
from swiftray.algorithms.dpo import DPO
from swiftray.algorithms.gkd import GKD
from swiftray.algorithms.grpo import DAPO, GRPO
from swiftray.algorithms.kto import KTO
from swiftray.algorithms.orpo import ORPO
from swiftray.algorithms.ppo import PPO
from swiftray.algorithms.rm import RewardModeling
from swiftray.algorithms.sft import SFT
from swiftray.algorithms.simpo import SimPO

__all__ = ["ALGORITHMS", "CPO", "DAPO", "DPO", "GKD", "GRPO", "KTO", "ORPO", "PPO", "SFT", "Algorithm",
           "RewardModeling", "SimPO", "get_algorithm", "register_algorithm"]
