"""GRPO (Shao et al. 2024) and DAPO (Yu et al. 2025): rollouts + rewards -> advantages -> clipped loss.

The formulas live in `grpo_math.py`; this class holds the settings, decides
which roles a run needs, and turns a scored RolloutBatch into a training batch.
Subclass it to change one piece, e.g. the advantage:

    @register_algorithm("my_grpo")
    class MyGRPO(GRPO):
        def advantages(self, rewards, batch):
            return rewards - rewards.mean()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swiftray.algorithms.base import Algorithm, RoleSpec, register_algorithm, single_loss_type
from swiftray.algorithms.grpo_math import dynamic_sample_filter, group_advantages, policy_loss
from swiftray.algorithms.roles import reference_role, reward_model_roles, reward_role
from swiftray.experience import RolloutBatch, completion_logprobs_to_tokens, sequences_batch

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@register_algorithm("grpo")
@dataclass
class GRPO(Algorithm):
    num_generations: int = 8
    scale_rewards: str = "group"
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    max_completion_length: int = 512
    overlong_filter: bool = False
    dynamic_sample: bool = False
    num_iterations: int = 1
    max_staleness: int = 0
    role_specs: tuple[RoleSpec, ...] = ()
    data_source = "rollouts"

    @classmethod
    def from_args(cls, args: Any) -> GRPO:
        models = reward_model_roles(args)
        # The reward functions' actor, unless reward models alone score (--reward_model without --reward_funcs).
        rules = (reward_role(args),) if args.reward_funcs or not models else ()
        roles = rules + models + ((reference_role(args),) if args.beta != 0 else ())
        return cls(num_generations=args.num_generations, scale_rewards=args.scale_rewards, beta=args.beta,
                   epsilon=args.epsilon,
                   epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                   loss_type=single_loss_type(args, GRPO_LOSS_TYPES, cls.loss_type),
                   max_completion_length=args.max_completion_length,
                   overlong_filter=args.overlong_filter, dynamic_sample=args.dynamic_sample,
                   num_iterations=args.num_iterations, max_staleness=1 if args.async_generate else 0,
                   role_specs=roles)

    @property
    def resample_filtered(self) -> bool:  # type: ignore[override]
        return self.dynamic_sample

    # -- experience

    def advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        """One advantage per completion; completions of a prompt are adjacent."""
        return group_advantages(rewards, self.num_generations, self.scale_rewards)

    def keep_groups(self, batch: RolloutBatch) -> list[int]:
        """Indices of completions to train on: with dynamic sampling, groups whose rewards differ."""
        if not self.dynamic_sample:
            return list(range(len(batch)))
        keep = dynamic_sample_filter(torch.tensor(batch.rewards, dtype=torch.float64), self.num_generations)
        return [i for i, k in enumerate(keep.tolist()) if k]

    def make_experience(self, batch: RolloutBatch, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The whole step's training rows: sequences, labels on completions, advantages, reference log-probs."""
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        loss_on = [not t for t in batch.truncated] if self.overlong_filter else None
        rows = sequences_batch(batch.prompt_ids, batch.completion_ids, pad_token_id, loss_on=loss_on)
        rows["advantages"] = self.advantages(rewards, batch).float()
        if self.beta != 0:
            if batch.ref_logprobs is None:
                raise ValueError("beta != 0 but the rollouts carry no reference log-probs")
            rows["ref_logprobs"] = completion_logprobs_to_tokens(
                batch.ref_logprobs, [len(p) for p in batch.prompt_ids], rows["input_ids"].shape[1])
        return rows

    # -- loss

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["labels"][:, 1:] != -100
        # A step whose completions were all masked (e.g. all overlong) has no tokens: loss 0, not 0/0.
        global_tokens = max(1, num_tokens_global) if self.loss_type == "dapo" else None
        loss, metrics = policy_loss(
            token_logprobs, batch.get("old_logprobs"), batch["advantages"], mask, loss_type=self.loss_type,
            epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta=self.beta,
            ref_logprobs=batch.get("ref_logprobs"), max_completion_length=self.max_completion_length,
            num_sequences_global=int(batch["num_sequences_global"]), num_tokens_global=global_tokens,
            entropies=batch.get("entropies"))
        if self.loss_type == "bnpo":
            # bnpo averages over each micro-batch's tokens; the step sums micro-batches, so divide by their count.
            loss = loss / int(batch["num_micro_batches_global"])
        return loss, metrics


@register_algorithm("dapo")
@dataclass
class DAPO(GRPO):
    """DAPO (Yu et al. 2025) as ms-swift configures it: token-level loss over the global batch,
    clip-higher, dynamic sampling, overlong filtering. The one place DAPO's defaults live."""

    loss_type: str = "dapo"
    epsilon_high: float | None = 0.28
    dynamic_sample: bool = True
    overlong_filter: bool = True

    @classmethod
    def from_args(cls, args: Any) -> DAPO:
        algo = super().from_args(args)
        if args.epsilon_high is None:
            algo.epsilon_high = 0.28
        algo.dynamic_sample = True
        algo.overlong_filter = True
        return algo
