"""GRPO (Shao et al. 2024) and DAPO (Yu et al. 2025): rollouts + rewards -> advantages -> clipped loss.

The formulas live in `grpo_math.py` and `advantages.py`; this class holds the settings, decides
which roles a run needs, and turns a scored RolloutBatch into a training batch.

`--advantage_estimator` picks the advantage, as ms-swift does: grpo (group-normalised), rloo
(leave-one-out baseline) or reinforce_plus_plus (REINFORCE++-baseline: group-centred, normalised over
the batch); `--scale_rewards` defaults to the estimator's. `--kl_in_reward` (default on for rloo and
reinforce_plus_plus) moves the KL from the loss into the reward: each reward loses beta x the sum of
its tokens' `old - ref` log-probs before the estimator, so the policy annotates the rollouts with its
log-probs (`annotate_with_policy`) and the loss has no KL term.

Rollout correction (`--rollout_importance_sampling_mode`, rollout_correction.py): the engines return
each completion's token log-probs, and the policy-gradient term of each token is weighted by the
truncated (or masked) ratio of the policy's probability to the engine's. Whenever the engines return
log-probs (also with `--rollout_dtype` alone) the mismatch is logged under `rollout_correction/`.

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

from swiftray.algorithms.advantages import (
    default_kl_in_reward,
    default_scale_rewards,
    estimator_advantages,
    sequence_kl,
)
from swiftray.algorithms.base import Algorithm, RoleSpec, register_algorithm, single_loss_type
from swiftray.algorithms.grpo_math import dynamic_sample_filter, policy_loss
from swiftray.algorithms.roles import reference_role, reward_roles
from swiftray.algorithms.rollout_correction import importance_weights, mismatch_metrics
from swiftray.experience import RolloutBatch, completion_frame, completion_logprobs_to_tokens, sequences_batch

DEFAULT_BETA = 0.04  # ms-swift's GRPO default (Shao et al. 2024)

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@register_algorithm("grpo")
@dataclass
class GRPO(Algorithm):
    num_generations: int = 8
    scale_rewards: str = "group"
    beta: float = DEFAULT_BETA
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    max_completion_length: int = 512
    overlong_filter: bool = False
    dynamic_sample: bool = False
    num_iterations: int = 1
    max_staleness: int = 0
    advantage_estimator: str = "grpo"
    kl_in_reward: bool = False
    rollout_is_mode: str | None = None  # --rollout_importance_sampling_mode
    rollout_is_threshold: float = 2.0
    role_specs: tuple[RoleSpec, ...] = ()
    data_source = "rollouts"

    @classmethod
    def from_args(cls, args: Any) -> GRPO:
        beta = DEFAULT_BETA if args.beta is None else args.beta
        estimator = args.advantage_estimator
        roles = reward_roles(args) + ((reference_role(args),) if beta != 0 else ())
        return cls(num_generations=args.num_generations,
                   scale_rewards=args.scale_rewards or default_scale_rewards(estimator), beta=beta,
                   advantage_estimator=estimator,
                   kl_in_reward=default_kl_in_reward(estimator) if args.kl_in_reward is None else args.kl_in_reward,
                   epsilon=args.epsilon,
                   epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                   loss_type=single_loss_type(args, GRPO_LOSS_TYPES, cls.loss_type),
                   max_completion_length=args.max_completion_length,
                   overlong_filter=args.overlong_filter, dynamic_sample=args.dynamic_sample,
                   num_iterations=args.num_iterations, max_staleness=1 if args.async_generate else 0,
                   rollout_is_mode=args.rollout_importance_sampling_mode,
                   rollout_is_threshold=args.rollout_importance_sampling_threshold, role_specs=roles)

    @property
    def resample_filtered(self) -> bool:  # type: ignore[override]
        return self.dynamic_sample

    @property
    def kl_penalises_reward(self) -> bool:
        """The KL is a reward penalty (kl_in_reward with beta != 0), not a loss term."""
        return self.kl_in_reward and self.beta != 0

    @property
    def annotate_with_policy(self) -> bool:  # type: ignore[override]
        return self.kl_penalises_reward  # the penalty needs the rollout policy's log-probs

    @property
    def uses_rollout_logprobs(self) -> bool:  # type: ignore[override]
        return self.rollout_is_mode is not None

    # -- experience

    def advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        """One advantage per completion, by --advantage_estimator; completions of a prompt are adjacent.
        With kl_in_reward, each reward first loses beta x its sequence KL (advantages.py)."""
        kl_values = None
        if self.kl_penalises_reward:
            kl_values = self.sequence_kl(batch).to(rewards.dtype)
        advantages, _ = estimator_advantages(rewards, self.num_generations, self.advantage_estimator,
                                             self.scale_rewards, kl_values=kl_values, beta=self.beta)
        return advantages

    @staticmethod
    def sequence_kl(batch: RolloutBatch) -> torch.Tensor:
        """Each completion's sum over its tokens of the rollout policy's minus the reference's log-prob."""
        if batch.ref_logprobs is None or "logprobs" not in batch.annotations:
            raise ValueError("kl_in_reward needs the rollouts' policy and reference log-probs")
        logprobs, ref = completion_frame(batch.annotations["logprobs"]), completion_frame(batch.ref_logprobs)
        mask = completion_frame([[1.0] * len(c) for c in batch.completion_ids]).bool()
        return sequence_kl(logprobs.double(), ref.double(), mask)

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
        prompt_lens, width = [len(p) for p in batch.prompt_ids], rows["input_ids"].shape[1]
        if self.kl_penalises_reward:  # the KL is in the advantages; the ratio takes the annotated log-probs
            rows["old_logprobs"] = completion_logprobs_to_tokens(batch.annotations["logprobs"], prompt_lens, width)
        elif self.beta != 0:
            if batch.ref_logprobs is None:
                raise ValueError("beta != 0 but the rollouts carry no reference log-probs")
            rows["ref_logprobs"] = completion_logprobs_to_tokens(batch.ref_logprobs, prompt_lens, width)
        if "rollout_logprobs" in batch.annotations:  # the engines' own log-probs (rollout correction)
            rows["rollout_logprobs"] = completion_logprobs_to_tokens(batch.annotations["rollout_logprobs"],
                                                                     prompt_lens, width)
        return rows

    def experience_metrics(self, batch: RolloutBatch, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        if not self.kl_penalises_reward:
            return {}
        return {"kl_in_reward/sequence_kl_mean": float(self.sequence_kl(batch).mean())}

    # -- loss

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["labels"][:, 1:] != -100
        # A step whose completions were all masked (e.g. all overlong) has no tokens: loss 0, not 0/0.
        global_tokens = max(1, num_tokens_global) if self.loss_type == "dapo" else None
        weights, correction = self.rollout_correction(token_logprobs, batch, mask)
        loss, metrics = policy_loss(
            token_logprobs, batch.get("old_logprobs"), batch["advantages"], mask, loss_type=self.loss_type,
            epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta=0.0 if self.kl_in_reward else self.beta,
            ref_logprobs=batch.get("ref_logprobs"), max_completion_length=self.max_completion_length,
            num_sequences_global=int(batch["num_sequences_global"]), num_tokens_global=global_tokens,
            entropies=batch.get("entropies"), is_weights=weights)
        metrics.update(correction)
        if self.loss_type == "bnpo":
            # bnpo averages over each micro-batch's tokens; the step sums micro-batches, so divide by their count.
            loss = loss / int(batch["num_micro_batches_global"])
        return loss, metrics

    def rollout_correction(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
                           mask: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The importance weights of --rollout_importance_sampling_mode (None without it) and the
        engines' mismatch metrics, when the rollouts carry the engines' log-probs."""
        if "rollout_logprobs" not in batch:
            return None, {}
        old = batch.get("old_logprobs")
        old = token_logprobs.detach() if old is None else old  # on-policy: the policy at the step's start
        metrics = mismatch_metrics(old, batch["rollout_logprobs"], mask)
        if self.rollout_is_mode is None:
            return None, metrics
        weights, is_metrics = importance_weights(old, batch["rollout_logprobs"], mask, self.rollout_is_mode,
                                                 self.rollout_is_threshold)
        return weights, {**metrics, **is_metrics}


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
