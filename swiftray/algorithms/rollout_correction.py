"""Rollout correction: the rollout engines' log-probs differ from the policy's (a bf16 engine beside an
fp32 policy, another kernel, vLLM), so the completions are not quite the policy's own samples. Truncated
(or masked) importance sampling re-weights each token's policy-gradient term by how much more likely the
policy finds it than the engine that sampled it (Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"; ms-swift's --rollout_importance_sampling_mode, verl's rollout_is).

With ``d_t = old_t - rollout_t`` (the policy's log-prob at the start of the step minus the engine's) over
a completion's tokens:

    token_truncate      w_t = min(exp(d_t), C)
    token_mask          w_t = exp(d_t) if exp(d_t) <= C else 0
    sequence_truncate   w_t = min(exp(sum_t d_t), C)            (one weight for all of a completion's tokens)
    sequence_mask       w_t = exp(sum_t d_t) if that <= C else 0

The weights carry no gradient. The mismatch itself is logged whatever the mode: ``kl`` estimates
KL(engine || policy) as the token mean of ``-d`` (k1) and ``k3_kl`` as that of ``exp(d) - d - 1``.
Pure tensor functions, like grpo_math.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
MAX_LOG_WEIGHT = 20.0  # exp(20) ~ 5e8: far past any threshold, and never inf


@torch.no_grad()
def importance_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, mode: str,
                       threshold: float) -> tuple[Tensor, dict[str, float]]:
    """Weights ``[B, T]`` (0 off the mask) for the policy-gradient term, and their metrics."""
    if mode not in MODES:
        raise ValueError(f"rollout importance sampling mode {mode!r}: expected one of {MODES}")
    mask_f = mask.to(old_logprobs.dtype)
    delta = (old_logprobs - rollout_logprobs) * mask_f
    if mode.startswith("token"):
        raw = torch.exp(delta.clamp(max=MAX_LOG_WEIGHT))
    else:
        raw = torch.exp(delta.sum(-1, keepdim=True).clamp(max=MAX_LOG_WEIGHT)).expand_as(delta)
    over = raw > threshold
    weights = raw.clamp(max=threshold) if mode.endswith("truncate") else torch.where(over, 0.0, raw)
    weights = weights * mask_f
    count = mask_f.sum().clamp(min=1.0)
    metrics = {"rollout_correction/is_weight_mean": float(weights.sum() / count),
               "rollout_correction/is_over_threshold": float((over.to(mask_f.dtype) * mask_f).sum() / count)}
    return weights, metrics


@torch.no_grad()
def mismatch_metrics(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the engine's token log-probs are from the policy's (token means over the mask)."""
    mask_f = mask.to(old_logprobs.dtype)
    delta = (old_logprobs - rollout_logprobs).clamp(-MAX_LOG_WEIGHT, MAX_LOG_WEIGHT)
    count = mask_f.sum().clamp(min=1.0)
    return {"rollout_correction/kl": float((-delta * mask_f).sum() / count),
            "rollout_correction/k3_kl": float(((torch.exp(delta) - delta - 1.0) * mask_f).sum() / count),
            "rollout_correction/max_abs_logprob_diff": float((delta.abs() * mask_f).max()) if mask_f.any() else 0.0}
