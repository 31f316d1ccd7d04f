"""KTO (Ethayarajh et al. 2024), fed by examples labelled desirable or not (`swiftray rlhf --rlhf_type kto`).

The formulas live in `preference_math.py`. Settings are ms-swift's: `--beta` 0.1, `--loss_type kto |
apo_zero_unpaired`, `--desirable_weight`, `--undesirable_weight`, `--reference_free`,
`--precompute_ref_log_probs`. A micro-batch's rows (data/kinds.py "kto") alternate an example and its
KL completion (another example's completion after this example's prompt, sharing the prompt); the
reference role attaches `ref_logps` to every row.

KTO's reference point z0 (the KL estimate, no gradient) is the mean of log π - log ref over the KL
rows of this micro-batch on every rank (TRL gathers it across devices per micro-step the same way), so
that N ranks of B examples equal one rank of N x B.

Logged: rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected (means over the
desirable and undesirable examples of the step) and kl, as TRL's KTO trainer names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from swiftray.algorithms.base import Algorithm, RoleSpec, register_algorithm, single_loss_type
from swiftray.algorithms.dpo import reference_logps
from swiftray.algorithms.preference_math import (
    KTO_LOSS_TYPES,
    kto_loss,
    kto_summarize_metrics,
    sequence_logps,
    split_pairs,
)
from swiftray.algorithms.roles import reference_role


@torch.no_grad()
def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over every rank of the process group this runs in (this process's alone
    outside one). Every rank must call it the same number of times."""
    total = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)]).double()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).to(values.dtype)


@register_algorithm("kto")
@dataclass
class KTO(Algorithm):
    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference_free: bool = False
    annotate_once: bool = False  # --precompute_ref_log_probs
    role_specs: tuple[RoleSpec, ...] = ()
    data_source = "dataset"
    dataset_kind = "kto"

    @classmethod
    def from_args(cls, args: Any) -> KTO:
        roles = () if args.reference_free else (reference_role(args),)
        return cls(beta=args.beta, loss_type=single_loss_type(args, KTO_LOSS_TYPES, "kto"),
                   desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                   reference_free=args.reference_free,
                   annotate_once=args.precompute_ref_log_probs and not args.reference_free, role_specs=roles)

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        logps, _ = sequence_logps(token_logprobs, batch["loss_mask"])
        ref = torch.zeros_like(logps) if self.reference_free else reference_logps(batch, logps, "KTO")
        example, kl_row = split_pairs(logps)
        ref_example, ref_kl_row = split_pairs(ref)
        z0 = global_mean(kl_row.detach() - ref_kl_row).clamp(min=0)
        return kto_loss(example, ref_example, batch["desirable"].to(example.device), z0, beta=self.beta,
                        desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                        loss_type=self.loss_type, num_examples_global=int(batch["num_examples_global"]))

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        return kto_summarize_metrics(metrics)
