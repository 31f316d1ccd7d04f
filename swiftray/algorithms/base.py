"""What an algorithm is: the roles it needs, how it turns rollouts into a batch, and its loss.

Algorithms never touch Ray. The controller sequences the roles; the policy
actor computes token log-probs and calls `algorithm.loss` on them. A user's
algorithm is a subclass registered under a name:

    from swiftray.algorithms import register_algorithm
    from swiftray.algorithms.grpo import GRPO

    @register_algorithm("my_grpo")
    class MyGRPO(GRPO):
        def advantages(self, rewards, num_generations): ...

and is picked with `--rlhf_type my_grpo --external_plugins my_algo.py`.
"""

from __future__ import annotations

from typing import Any

import torch

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str):
    """Class decorator: make an algorithm available as `--rlhf_type NAME`."""

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return wrap


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))} "
                         "(add your own with --external_plugins)")
    return ALGORITHMS[name]


class Algorithm:
    """Base class. Subclasses set `roles` and implement `loss` (and `make_experience` for RL)."""

    name: str = "base"
    # Which actor groups the controller starts: "policy" always; RL adds "rollout",
    # "reward" and, when the KL term is on, "reference".
    roles: tuple[str, ...] = ("policy",)
    # How many optimizer steps older than the policy a rollout may be (async generation).
    max_staleness: int = 0

    def needs_reference(self) -> bool:
        return "reference" in self.roles

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch. `token_logprobs[b, t]` is log p(labels[b, t+1] | tokens <= t);
        `num_tokens_global` counts loss tokens over every rank and micro-batch of the step."""
        raise NotImplementedError
