"""DPO (Rafailov et al. 2023) and its loss variants, fed by preference pairs (`swiftray rlhf --rlhf_type dpo`).

The formulas live in `preference_math.py`. This class holds ms-swift's settings (`--beta` 0.1,
`--loss_type` one or several of `DPO_LOSS_TYPES` with `--loss_weights`, `--label_smoothing`,
`--rpo_alpha`, `--discopop_tau`, `--reference_free`), declares the reference role it needs (none when
reference-free), and turns a micro-batch of pair rows into the loss:

    rows       chosen_0, rejected_0, chosen_1, ... (data/kinds.py "pairs"; a pair shares its prompt)
    ref_logps  the reference model's completion log-prob of each row, from the reference role
               (each step, or once over the dataset with --precompute_ref_log_probs)

Logged: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected (and nll_loss with an NLL term), as TRL and ms-swift name them.

bco_pair's reward shift is the running mean of the mean reward of the steps before this one (TRL
updates it per loss call, this step's batch included): a statistic over whole steps, so that N ranks
equal one, kept on the driver (`observe`) and in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from swiftray.algorithms.base import Algorithm, RoleSpec, register_algorithm
from swiftray.algorithms.preference_math import (
    DPO_LOSS_TYPES,
    RunningMoments,
    dpo_loss,
    pair_logps,
    split_pairs,
)
from swiftray.algorithms.roles import reference_role


def reference_logps(batch: dict[str, Any], like: torch.Tensor, algorithm: str) -> torch.Tensor:
    """The micro-batch's per-row reference log-probs, which the reference role attached."""
    ref = batch.get("ref_logps")
    if ref is None:
        raise ValueError(f"{algorithm}: the micro-batch carries no reference log-probs (ref_logps); the reference "
                         "role annotates each step's rows, unless --reference_free true")
    return ref.to(like.device, like.dtype)


@register_algorithm("dpo")
@dataclass
class DPO(Algorithm):
    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    discopop_tau: float = 0.05
    reference_free: bool = False
    annotate_once: bool = False  # --precompute_ref_log_probs
    role_specs: tuple[RoleSpec, ...] = ()
    bco_running: RunningMoments = field(default_factory=RunningMoments)
    data_source = "dataset"
    dataset_kind = "pairs"

    @classmethod
    def from_args(cls, args: Any) -> DPO:
        from swiftray.arguments import ArgumentError

        types = tuple(args.loss_type or ("sigmoid",))
        unknown = [t for t in types if t not in DPO_LOSS_TYPES]
        if unknown:
            raise ArgumentError(f"--loss_type {' '.join(unknown)}: DPO takes any of {', '.join(DPO_LOSS_TYPES)}")
        weights = tuple(args.loss_weights) if args.loss_weights is not None else None
        if weights is not None and len(weights) != len(types):
            raise ArgumentError(f"--loss_weights has {len(weights)} values for {len(types)} --loss_type values "
                                f"({' '.join(types)}); give one weight each")
        roles = () if args.reference_free else (reference_role(args),)
        return cls(beta=args.beta, loss_type=types, loss_weights=weights, label_smoothing=args.label_smoothing,
                   rpo_alpha=args.rpo_alpha, discopop_tau=args.discopop_tau, reference_free=args.reference_free,
                   annotate_once=args.precompute_ref_log_probs and not args.reference_free, role_specs=roles)

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected, chosen_lengths, rejected_lengths = pair_logps(token_logprobs, batch["loss_mask"])
        ref_chosen = ref_rejected = None
        if not self.reference_free:
            ref_chosen, ref_rejected = split_pairs(reference_logps(batch, chosen, "DPO"))
        return dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=list(self.loss_type),
            loss_weights=self.loss_weights, label_smoothing=self.label_smoothing, rpo_alpha=self.rpo_alpha,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, discopop_tau=self.discopop_tau,
            bco_delta=self.bco_running.mean, reference_free=self.reference_free,
            num_pairs_global=int(batch["num_pairs_global"]),
            num_chosen_tokens_global=int(batch["num_chosen_tokens_global"]))

    def observe(self, metrics: dict[str, float]) -> None:
        if "bco_pair" in self.loss_type:  # the step's mean reward: chosen and rejected sides are equal in number
            step_mean = (metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2
            self.bco_running.update(torch.tensor([step_mean]))

    def state_dict(self) -> dict[str, Any]:
        return {"bco_running": self.bco_running.state_dict()} if "bco_pair" in self.loss_type else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "bco_running" in state:
            self.bco_running.load_state_dict(state["bco_running"])
