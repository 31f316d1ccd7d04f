"""ORPO (Hong et al. 2024), fed by preference pairs, no reference model (`swiftray rlhf --rlhf_type orpo`).

The loss is the chosen responses' NLL minus `--beta` (the paper's lambda, ms-swift's default 0.1) times
the log-sigmoid of the log odds ratio of chosen over rejected, on per-token averaged log-probs
(`preference_math.orpo_loss`). Logged: the pair metrics (rewards are beta x averaged log-probs, as TRL
logs them), nll_loss, log_odds_ratio and log_odds_chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swiftray.algorithms.base import Algorithm, register_algorithm
from swiftray.algorithms.preference_math import orpo_loss, pair_logps


@register_algorithm("orpo")
@dataclass
class ORPO(Algorithm):
    beta: float = 0.1
    data_source = "dataset"
    dataset_kind = "pairs"

    @classmethod
    def from_args(cls, args: Any) -> ORPO:
        return cls(beta=args.beta)

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected, chosen_lengths, rejected_lengths = pair_logps(token_logprobs, batch["loss_mask"])
        return orpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, beta=self.beta,
                         num_pairs_global=int(batch["num_pairs_global"]),
                         num_chosen_tokens_global=int(batch["num_chosen_tokens_global"]))
