"""The numerics of offline preference learning: DPO and its loss variants, KTO, ORPO, CPO/SimPO, and the
pairwise reward-model loss.

Pure tensor functions with no knowledge of Ray, models or devices. Each takes sequence-level log-probs
(the sum of a completion's token log-probs, ``sequence_logps``) and returns ``(loss, metrics)``. Semantics
and defaults are ms-swift's (``swift/rlhf_trainers``), which sit on TRL's DPO/KTO/ORPO/CPO/Reward trainers:

- DPO (Rafailov et al. 2023): ``Δ = (π_c - π_r) - (ref_c - ref_r)``; ``loss_type`` one or a list of
  ``DPO_LOSS_TYPES`` with ``loss_weights`` (ms-swift's MPO), ``label_smoothing`` (cDPO / robust DPO / EXO),
  ``rpo_alpha`` (RPO: adds the NLL of the chosen completions). IPO uses per-token averaged log-probs, as
  TRL does (only inside the IPO term; ms-swift averages for every term when ``ipo`` is in the list).
  The rewards logged are ``β (π - ref)`` whatever the loss mix (TRL's choice; ms-swift sums them per weight).
- KTO (Ethayarajh et al. 2024): per-example losses against the reference point ``z0``, the batch estimate of
  KL(π || ref) from mismatched (prompt, completion) pairs (``kto_kl_estimate``).
- ORPO (Hong et al. 2024): NLL of chosen + ``β`` x the log-sigmoid of the log odds ratio, per-token averaged.
- CPO (Xu et al. 2024) and SimPO (Meng et al. 2024): reference-free; ``cpo_alpha`` x NLL of chosen added.
- Reward model (Ouyang et al. 2022): ``-log σ(r_c - r_r - margin)`` + ``center_rewards_coefficient`` x
  ``(r_c + r_r)²`` (Eisenstein et al. 2023).

Row layout: a pair is two rows that share a prompt, chosen first, adjacent (``split_pairs``): the same
layout as GRPO groups of two, so prompt sharing and rank splitting keep a pair together.

Multi-worker use (as in ``grpo_math``): each worker holds a slice of the step's pairs. Pass
``num_pairs_global`` (pairs over all workers and micro-batches of the optimizer step) and, for the NLL
terms (RPO, ORPO, CPO, DPO's ``sft``), ``num_chosen_tokens_global`` (chosen completion tokens over the
same). The returned loss is then this slice's share: summing it over every micro-batch and worker gives
the single-process loss of the whole batch, so N ranks equal one. Backends that *average* gradients over
workers (DDP, FSDP, ZeRO) must multiply it by the world size, as the policy actor does. Without them, the
counts of this call are used, which is ms-swift's per-micro-batch mean. Two statistics are global by
nature and the caller must make them so before the call: KTO's ``kl`` (mean over every worker's
mismatched pairs) and ``bco_pair``'s running reward mean (``RunningMoments.update`` on gathered rewards).
Metrics are means over this call's pairs (KTO: sums and counts, see ``kto_loss``), so averaging them over
equal-sized micro-batches and ranks gives the global mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "exo_pair", "nca_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "simpo")
# Loss types that need the completions' token counts (length-normalised terms or the NLL).
_NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "sft")
EXO_DEFAULT_EPSILON = 1e-3  # ms-swift's value for exo_pair when label_smoothing is 0


# ---------------------------------------------------------------------------------------- row helpers


def sequence_logps(token_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of each row's masked token log-probs ``[B]`` and its number of masked tokens ``[B]``.

    ``token_logprobs`` and ``mask`` are ``[B, T]`` (the policy actor's layout: zero off the labels).
    """
    if token_logprobs.shape != mask.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} differ")
    mask_f = mask.to(token_logprobs.dtype)
    return (token_logprobs * mask_f).sum(-1), mask_f.sum(-1)


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """Rows laid out chosen, rejected, chosen, rejected, ... -> (chosen ``[P]``, rejected ``[P]``)."""
    if values.shape[0] % 2:
        raise ValueError(f"{values.shape[0]} rows is not a whole number of (chosen, rejected) pairs")
    return values[0::2], values[1::2]


def pair_logps(token_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows chosen, rejected, ... (``[2P, T]``) -> completion sums and token counts of each side ``[P]``:
    (chosen, rejected, chosen lengths, rejected lengths)."""
    logps, lengths = sequence_logps(token_logprobs, mask)
    return (*split_pairs(logps), *split_pairs(lengths))


def _as_list(loss_type: str | Sequence[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def _count(given: int | float | None, fallback: Tensor | int) -> Tensor | float:
    """The caller's global count, else this call's own (at least 1, so an empty call gives 0, not nan)."""
    if given is not None:
        return float(given)
    return fallback if isinstance(fallback, Tensor) else max(1, fallback)


def _check_pairs(**tensors: Tensor | None) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of one length (one value per pair), got {shapes}")


def _chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor, num_chosen_tokens_global: int | float | None) -> Tensor:
    """Token-mean NLL of the chosen completions: -(sum of their token log-probs) / token count."""
    tokens = _count(num_chosen_tokens_global, chosen_lengths.sum().clamp(min=1.0))
    return -chosen_logps.sum() / tokens


@torch.no_grad()
def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                  rejected_logps: Tensor) -> dict[str, float]:
    """TRL's and ms-swift's names: the means over this call's pairs."""
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "logps/chosen": float(chosen_logps.mean()),
        "logps/rejected": float(rejected_logps.mean()),
    }


# ---------------------------------------------------------------------------------------- DPO


def dpo_pair_losses(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    loss_type: str,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | Tensor = 0.0,
) -> Tensor:
    """Per-pair loss ``[P]`` of one DPO ``loss_type`` (the ``sft`` type is batch-level: see ``dpo_loss``).

    Log-probs are completion sums. ``chosen_lengths``/``rejected_lengths`` (token counts) are needed by
    ``ipo`` and ``sigmoid_norm``, which compare per-token averages. ``bco_delta``: BCO's reward shift, the
    running mean of the rewards (``RunningMoments``); 0 gives the shift-free form.
    """
    c_ratio = chosen_logps - ref_chosen_logps  # log π/ref of the chosen completion
    r_ratio = rejected_logps - ref_rejected_logps
    logits = c_ratio - r_ratio  # = (π_c - π_r) - (ref_c - ref_r)
    eps = label_smoothing
    if loss_type == "sigmoid":  # DPO; cDPO with label smoothing
        return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    if loss_type == "robust":  # Chowdhury et al. 2024: unbiased under label flips with probability eps
        return (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    if loss_type == "hinge":  # SLiC
        return torch.relu(1 - beta * logits)
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} averages over tokens: pass chosen_lengths and rejected_lengths")
        avg = c_ratio / chosen_lengths.clamp(min=1.0) - r_ratio / rejected_lengths.clamp(min=1.0)
        if loss_type == "ipo":  # Azar et al. 2023, eq. 17, beta as tau
            return (avg - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * avg)
    if loss_type == "exo_pair":  # Ji et al. 2024, eq. 16: KL from the smoothed label distribution
        eps = eps or EXO_DEFAULT_EPSILON
        return torch.sigmoid(beta * logits) * (F.logsigmoid(beta * logits) - math.log(1 - eps)) + torch.sigmoid(
            -beta * logits
        ) * (F.logsigmoid(-beta * logits) - math.log(eps))
    if loss_type == "nca_pair":  # Chen et al. 2024
        c, r = beta * c_ratio, beta * r_ratio
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "bco_pair":  # Jung et al. 2024, with the running reward mean as the shift
        return -F.logsigmoid(beta * c_ratio - bco_delta) - F.logsigmoid(-(beta * r_ratio - bco_delta))
    if loss_type == "sppo_hard":  # Wu et al. 2024, hard win probabilities
        return (c_ratio - 0.5 / beta) ** 2 + (r_ratio + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):  # D'Oosterlinck et al. 2024: sorted within the batch
        if loss_type == "aot":
            delta = torch.sort(chosen_logps - rejected_logps)[0] - torch.sort(ref_chosen_logps - ref_rejected_logps)[0]
        else:
            delta = torch.sort(c_ratio)[0] - torch.sort(r_ratio)[0]
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if loss_type == "apo_zero":  # D'Oosterlinck et al. 2024, eq. 7
        return (1 - torch.sigmoid(beta * c_ratio)) + torch.sigmoid(beta * r_ratio)
    if loss_type == "apo_down":  # eq. 8
        return torch.sigmoid(beta * c_ratio) + (1 - torch.sigmoid(beta * logits))
    if loss_type == "discopop":  # Chris Lu et al. 2024, eq. 5
        scaled = beta * logits
        mix = torch.sigmoid(scaled / discopop_tau)
        return -F.logsigmoid(scaled) * (1 - mix) + torch.exp(-scaled) * mix
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | Tensor = 0.0,
    reference_free: bool = False,
    num_pairs_global: int | None = None,
    num_chosen_tokens_global: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """DPO loss of this call's pairs: ``Σ_k w_k mean(loss_k) + rpo_alpha * NLL(chosen)``, and its metrics.

    All log-probs ``[P]`` are completion sums. ``loss_type`` is one name or a list (ms-swift/TRL's MPO),
    weighted by ``loss_weights`` (default 1 each). ``reference_free`` (or ``ref_*_logps=None``) uses a
    reference of log-prob 0. The NLL terms (``rpo_alpha``, ``loss_type`` ``sft``) are the chosen tokens'
    mean negative log-prob and need ``chosen_lengths``. See the module docstring for the ``*_global`` counts.

    Metrics: ``rewards/chosen|rejected|accuracies|margins`` (rewards ``β (π - ref)``), ``logps/chosen|rejected``
    (completion sums), and ``nll_loss`` when an NLL term is on.
    """
    types = _as_list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    if not types or len(weights) != len(types):
        raise ValueError(f"loss_weights {weights} must give one weight per loss_type {types}")
    unknown = [t for t in types if t not in DPO_LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown DPO loss_type {unknown}; expected any of {DPO_LOSS_TYPES}")
    if reference_free or ref_chosen_logps is None or ref_rejected_logps is None:
        if not reference_free:
            raise ValueError("DPO needs ref_chosen_logps and ref_rejected_logps (or reference_free=True)")
        ref_chosen_logps, ref_rejected_logps = torch.zeros_like(chosen_logps), torch.zeros_like(rejected_logps)
    _check_pairs(chosen=chosen_logps, rejected=rejected_logps, ref_chosen=ref_chosen_logps,
                 ref_rejected=ref_rejected_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    wants_nll = rpo_alpha is not None or "sft" in types
    if (wants_nll or any(t in _NEEDS_LENGTHS for t in types)) and chosen_lengths is None:
        raise ValueError(f"loss_type={types} with rpo_alpha={rpo_alpha} needs chosen_lengths (token counts)")

    num_pairs = _count(num_pairs_global, chosen_logps.shape[0])
    nll = _chosen_nll(chosen_logps, chosen_lengths, num_chosen_tokens_global) if wants_nll else None
    loss = chosen_logps.new_zeros(())
    for name, weight in zip(types, weights):
        if name == "sft":
            loss = loss + weight * nll
            continue
        per_pair = dpo_pair_losses(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, name, beta=beta,
            label_smoothing=label_smoothing, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            discopop_tau=discopop_tau, bco_delta=bco_delta,
        )
        loss = loss + weight * per_pair.sum() / num_pairs
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * nll

    with torch.no_grad():
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    metrics = _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    if nll is not None:
        metrics["nll_loss"] = float(-chosen_logps.detach().sum() / chosen_lengths.sum().clamp(min=1.0))
    return loss, metrics


@dataclass
class RunningMoments:
    """Running mean and standard deviation of a stream (Welford's merge), for ``bco_pair``'s reward shift.

    ms-swift and TRL update it once per loss call with one value, the mean of that batch's chosen and
    rejected rewards ``β (π - ref)``, and pass the new running mean as ``bco_delta`` in the same call. To
    keep N workers equal to one, update with the step's global mean (the same value on every worker).
    """

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, values: Tensor) -> float:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return self.mean
        batch_var, batch_mean = torch.var_mean(values, unbiased=False)
        delta = float(batch_mean) - self.mean
        total = self.count + n
        merged = self.var * self.count + delta**2 * self.count * n / total + float(batch_var) * n
        self.mean += delta * n / total
        self.var = merged / total
        self.std = math.sqrt(self.var * total / (total - 1)) if total > 1 else 0.0
        self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])
        self.var, self.count = float(state["var"]), float(state["count"])


# ---------------------------------------------------------------------------------------- KTO


def kto_mismatched_order(n: int) -> list[int]:
    """Which completion each example is paired with for the KL estimate: TRL rotates by one within the
    batch, ``(x_i, y_{i-1})`` (``(x_0, y_{n-1})`` for the first)."""
    return [n - 1] + list(range(n - 1)) if n > 0 else []


@torch.no_grad()
def kto_kl_estimate(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0: mean of ``log π(y'|x) - log ref(y'|x)`` over mismatched pairs, clamped
    at 0, no gradient (Ethayarajh et al. 2024, eq. 7). With several workers, pass every worker's values
    (or compute the mean of the gathered values): TRL averages the per-worker means, equal with equal counts.
    """
    if kl_logps.numel() == 0:
        return kl_logps.new_zeros(())
    return (kl_logps - ref_kl_logps).mean().clamp(min=0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    num_examples_global: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KTO loss of this call's examples, each a completion labelled desirable or not, and its metrics.

    ``logps``, ``ref_logps``: completion sums ``[B]``; ``desirable``: bool ``[B]``; ``kl``: the reference
    point from ``kto_kl_estimate`` (ignored by ``apo_zero_unpaired``). Per example, with ``r = log π - log ref``:
    desirable ``w_d (1 - σ(β (r - z0)))``, undesirable ``w_u (1 - σ(β (z0 - r)))``; the loss is their sum
    over ``num_examples_global`` (default: this call's count, TRL's mean).

    Metrics are sums and counts, so that every call returns the same keys whatever its labels (the policy
    actor all-reduces metrics by key): ``rewards/chosen_sum``, ``logps/chosen_sum``, ``count/chosen``, the
    same for rejected, and ``kl``. ``kto_summarize_metrics`` turns the reduced values into TRL's
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    _check_pairs(logps=logps, ref_logps=ref_logps, desirable=desirable)
    desirable = desirable.bool()
    ratio = logps - ref_logps
    z0 = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach()
    if loss_type == "kto":
        good = 1 - torch.sigmoid(beta * (ratio - z0))
        bad = 1 - torch.sigmoid(beta * (z0 - ratio))
    else:  # APO-zero, unpaired: no reference point
        good = 1 - torch.sigmoid(beta * ratio)
        bad = torch.sigmoid(beta * ratio)
    per_example = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    loss = per_example.sum() / _count(num_examples_global, logps.shape[0])

    with torch.no_grad():
        rewards = beta * ratio
        chosen, rejected = desirable, ~desirable
        metrics = {
            "rewards/chosen_sum": float(rewards[chosen].sum()),
            "rewards/rejected_sum": float(rewards[rejected].sum()),
            "logps/chosen_sum": float(logps[chosen].sum()),
            "logps/rejected_sum": float(logps[rejected].sum()),
            "count/chosen": float(chosen.sum()),
            "count/rejected": float(rejected.sum()),
            "kl": float(z0),
        }
    return loss, metrics


def kto_summarize_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Sums and counts (averaged or summed alike over workers) -> TRL's per-example means, as its
    ``log`` does: ``rewards/chosen`` = chosen_sum / count, ``rewards/margins`` when both sides occur."""
    out = {k: v for k, v in metrics.items() if not k.endswith("_sum") and not k.startswith("count/")}
    for side in ("chosen", "rejected"):
        count = metrics.get(f"count/{side}", 0.0)
        if count > 0:
            out[f"rewards/{side}"] = metrics[f"rewards/{side}_sum"] / count
            out[f"logps/{side}"] = metrics[f"logps/{side}_sum"] / count
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# ---------------------------------------------------------------------------------------- ORPO, CPO, SimPO


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    num_pairs_global: int | None = None,
    num_chosen_tokens_global: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """ORPO: ``NLL(chosen) - β mean(log σ(log odds_c - log odds_r))``, no reference model (β is the paper's λ).

    Inputs are completion sums and token counts; the odds use per-token averaged log-probs
    ``p = exp(mean log-prob)``, ``odds = p / (1 - p)``, as TRL does. Metrics: the pair metrics (rewards
    ``β x`` averaged log-probs, ``logps/*`` averaged), ``nll_loss``, ``log_odds_ratio`` (mean log σ(·)),
    ``log_odds_chosen`` (mean log odds ratio).
    """
    _check_pairs(chosen=chosen_logps, rejected=rejected_logps, chosen_lengths=chosen_lengths,
                 rejected_lengths=rejected_lengths)
    avg_c = chosen_logps / chosen_lengths.clamp(min=1.0)
    avg_r = rejected_logps / rejected_lengths.clamp(min=1.0)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = _chosen_nll(chosen_logps, chosen_lengths, num_chosen_tokens_global)
    loss = nll - beta * ratio.sum() / _count(num_pairs_global, chosen_logps.shape[0])
    with torch.no_grad():
        metrics = _pair_metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)
        metrics["nll_loss"] = float(-chosen_logps.sum() / chosen_lengths.sum().clamp(min=1.0))
        metrics["log_odds_ratio"] = float(ratio.mean())
        metrics["log_odds_chosen"] = float(log_odds.mean())
    return loss, metrics


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 1.0,
    cpo_alpha: float = 1.0,
    num_pairs_global: int | None = None,
    num_chosen_tokens_global: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """CPO (TRL's CPOTrainer): ``mean(loss(π_c - π_r)) + cpo_alpha * NLL(chosen)``, reference-free.

    ``loss_type`` sigmoid (with label smoothing) and hinge compare completion sums; ipo and simpo compare
    per-token averages, simpo with the target margin ``(π_c - π_r) - simpo_gamma / β`` (Meng et al. 2024,
    eq. 6). Metrics: the pair metrics on the log-probs used (rewards ``β x`` them), and ``nll_loss``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}")
    _check_pairs(chosen=chosen_logps, rejected=rejected_logps, chosen_lengths=chosen_lengths,
                 rejected_lengths=rejected_lengths)
    if loss_type in ("ipo", "simpo"):
        used_c = chosen_logps / chosen_lengths.clamp(min=1.0)
        used_r = rejected_logps / rejected_lengths.clamp(min=1.0)
    else:
        used_c, used_r = chosen_logps, rejected_logps
    logits = used_c - used_r
    eps = label_smoothing
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        per_pair = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * logits)
    else:
        per_pair = (logits - 1 / (2 * beta)) ** 2
    loss = per_pair.sum() / _count(num_pairs_global, chosen_logps.shape[0])
    if cpo_alpha:
        loss = loss + cpo_alpha * _chosen_nll(chosen_logps, chosen_lengths, num_chosen_tokens_global)
    with torch.no_grad():
        metrics = _pair_metrics(beta * used_c, beta * used_r, used_c, used_r)
        metrics["nll_loss"] = float(-chosen_logps.sum() / chosen_lengths.sum().clamp(min=1.0))
    return loss, metrics


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    simpo_gamma: float = 1.0,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
    num_pairs_global: int | None = None,
    num_chosen_tokens_global: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024): ``-log σ(β (avg π_c - avg π_r) - γ)``; ``cpo_alpha > 0`` adds the NLL
    (CPO-SimPO). ms-swift's ``--rlhf_type simpo`` is CPO with loss_type simpo, beta 2.0, and its
    ``--cpo_alpha`` default 1.0, i.e. CPO-SimPO: pass ``cpo_alpha=args.cpo_alpha`` to match it."""
    return cpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=beta, loss_type="simpo",
                    label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha,
                    num_pairs_global=num_pairs_global, num_chosen_tokens_global=num_chosen_tokens_global)


# ---------------------------------------------------------------------------------------- reward model


def reward_model_loss(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    *,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    num_pairs_global: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Pairwise (Bradley-Terry) reward-model loss: ``mean(-log σ(r_c - r_r - margin))`` plus
    ``center_rewards_coefficient * mean((r_c + r_r)²)``, which pulls the rewards' mean towards 0.

    ``rewards_*``: the scalar head's outputs ``[P]`` (or ``[P, 1]``); ``margin``: an optional per-pair
    column (TRL's). Metrics: ms-swift's ``rewards/chosen|rejected|accuracies|margins`` and
    ``center_rewards_loss`` when on, and TRL's ``accuracy``, ``margin``, ``mean_reward`` (TRL's min/max
    are left out: they do not survive averaging over workers).
    """
    rewards_chosen, rewards_rejected = rewards_chosen.reshape(-1), rewards_rejected.reshape(-1)
    if margin is not None:
        margin = margin.reshape(-1).to(rewards_chosen.dtype)
    _check_pairs(chosen=rewards_chosen, rejected=rewards_rejected, margin=margin)
    num_pairs = _count(num_pairs_global, rewards_chosen.shape[0])
    diff = rewards_chosen - rewards_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).sum() / num_pairs
    centring = None
    if center_rewards_coefficient is not None:
        centring = center_rewards_coefficient * ((rewards_chosen + rewards_rejected) ** 2).sum() / num_pairs
        loss = loss + centring
    with torch.no_grad():
        c, r = rewards_chosen.detach(), rewards_rejected.detach()
        metrics = {
            "rewards/chosen": float(c.mean()),
            "rewards/rejected": float(r.mean()),
            "rewards/accuracies": float((c > r).float().mean()),
            "rewards/margins": float((c - r).mean()),
            "accuracy": float((c > r).float().mean()),
            "margin": float((c - r).mean()),
            "mean_reward": float((c + r).mean() / 2),
        }
        if centring is not None:
            metrics["center_rewards_loss"] = float(
                center_rewards_coefficient * ((c + r) ** 2).mean())
    return loss, metrics
