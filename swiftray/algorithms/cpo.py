"""CPO (Xu et al. 2024), fed by preference pairs, no reference model (`swiftray rlhf --rlhf_type cpo`).

TRL's CPO loss (`preference_math.cpo_loss`): a DPO-style loss on the policy's own log-probs of chosen
and rejected, plus `--cpo_alpha` (1.0) times the chosen responses' NLL. `--loss_type` sigmoid (the
default, with `--label_smoothing`), hinge, ipo or simpo (`--simpo_gamma`); `--beta` 0.1.
`--rlhf_type simpo` is this with loss_type simpo (simpo.py). Logged: the pair metrics and nll_loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swiftray.algorithms.base import Algorithm, register_algorithm, single_loss_type
from swiftray.algorithms.preference_math import CPO_LOSS_TYPES, cpo_loss, pair_logps


@register_algorithm("cpo")
@dataclass
class CPO(Algorithm):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 1.0
    cpo_alpha: float = 1.0
    data_source = "dataset"
    dataset_kind = "pairs"

    @classmethod
    def from_args(cls, args: Any) -> CPO:
        return cls(beta=args.beta, loss_type=single_loss_type(args, cls.allowed_loss_types(), cls.loss_type),
                   label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha)

    @classmethod
    def allowed_loss_types(cls) -> tuple[str, ...]:
        return CPO_LOSS_TYPES

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected, chosen_lengths, rejected_lengths = pair_logps(token_logprobs, batch["loss_mask"])
        return cpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma, cpo_alpha=self.cpo_alpha,
                        num_pairs_global=int(batch["num_pairs_global"]),
                        num_chosen_tokens_global=int(batch["num_chosen_tokens_global"]))
