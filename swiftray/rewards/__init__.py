"""Reward functions: the built-ins, the registry plug-ins add to, and RewardSet (see registry.py)."""

from swiftray.rewards.builtin import ORM, AsyncORM
from swiftray.rewards.registry import (
    REWARD_FUNCS,
    RewardFunctionError,
    RewardSet,
    build_reward_funcs,
    load_external_plugins,
    orms,
    register_reward,
    reward_metrics,
)

__all__ = [
    "ORM",
    "AsyncORM",
    "REWARD_FUNCS",
    "RewardFunctionError",
    "RewardSet",
    "build_reward_funcs",
    "load_external_plugins",
    "orms",
    "register_reward",
    "reward_metrics",
]
