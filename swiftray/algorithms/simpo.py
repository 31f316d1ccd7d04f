"""SimPO (Meng et al. 2024), fed by preference pairs, no reference model (`swiftray rlhf --rlhf_type simpo`).

As in ms-swift, SimPO is CPO with loss_type simpo: `-log σ(β (avg log π_c - avg log π_r) - γ)` with
`--beta` 2.0 and `--simpo_gamma` 1.0, plus `--cpo_alpha` (1.0: CPO-SimPO, ms-swift's default; 0: pure
SimPO) times the chosen responses' NLL. Logged: the pair metrics (on averaged log-probs) and nll_loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from swiftray.algorithms.base import register_algorithm
from swiftray.algorithms.cpo import CPO


@register_algorithm("simpo")
@dataclass
class SimPO(CPO):
    beta: float = 2.0
    loss_type: str = "simpo"

    @classmethod
    def allowed_loss_types(cls) -> tuple[str, ...]:
        return ("simpo",)
