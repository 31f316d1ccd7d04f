"""Reward modelling (Ouyang et al. 2022), fed by preference pairs (`swiftray rlhf --rlhf_type rm`).

The policy trains a sequence-classification head (`policy_head = "score"`: transformers'
`*ForSequenceClassification` with one output, scoring each row at its last token) instead of token
log-probs, with the pairwise loss `-log σ(r_chosen - r_rejected - margin)` plus
`--center_rewards_coefficient` x `(r_chosen + r_rejected)²` (`preference_math.reward_model_loss`;
`margin` from the dataset's optional column). Checkpoints load with
`AutoModelForSequenceClassification`, and `--reward_model CHECKPOINT` makes one a GRPO reward.

Logged: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins (ms-swift's names) and
accuracy, margin, mean_reward (TRL's), center_rewards_loss when on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swiftray.algorithms.base import Algorithm, register_algorithm
from swiftray.algorithms.preference_math import reward_model_loss, split_pairs


@register_algorithm("rm")
@dataclass
class RewardModeling(Algorithm):
    center_rewards_coefficient: float | None = None
    data_source = "dataset"
    dataset_kind = "pairs"
    policy_head = "score"

    @classmethod
    def from_args(cls, args: Any) -> RewardModeling:
        return cls(center_rewards_coefficient=args.center_rewards_coefficient)

    def loss(self, scores: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        """`scores`: each row's score [2P] (the policy's score head), rows chosen, rejected, ..."""
        chosen, rejected = split_pairs(scores)
        margin = batch.get("margin")
        return reward_model_loss(chosen, rejected, margin=margin.to(scores.device) if margin is not None else None,
                                 center_rewards_coefficient=self.center_rewards_coefficient,
                                 num_pairs_global=int(batch["num_pairs_global"]))
