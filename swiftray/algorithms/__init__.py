"""Algorithms: what to compute, never where. Importing this package registers the built-ins."""

from swiftray.algorithms.base import ALGORITHMS, Algorithm, get_algorithm, register_algorithm
from swiftray.algorithms.grpo import DAPO, GRPO
from swiftray.algorithms.sft import SFT

__all__ = ["ALGORITHMS", "DAPO", "GRPO", "SFT", "Algorithm", "get_algorithm", "register_algorithm"]
