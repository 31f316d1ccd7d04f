"""The numerics of GRPO and its variants (DAPO, Dr.GRPO, BNPO): advantages, the clipped policy loss, and
the DAPO batch filters.

Pure tensor functions with no knowledge of Ray, models or devices, so that every backend and the tests
call the same code. Semantics follow ms-swift's GRPO trainer (itself derived from TRL's):

- Advantages: rewards of one prompt's ``num_generations`` completions sit next to each other; the
  advantage is the reward minus its group mean, divided by a standard deviation (unbiased, as
  ``torch.std``) plus 1e-4.
- Loss per token: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * KL`` with the k3
  estimator ``KL = exp(ref - logp) - (ref - logp) - 1`` (Schulman's unbiased, always >= 0 estimator).
- Aggregation (``loss_type``), over the completion tokens selected by ``mask``:
    grpo     mean over each sequence's tokens, then mean over sequences (Shao et al. 2024)
    bnpo     sum over all tokens / number of tokens
    dr_grpo  sum over all tokens / (number of sequences * max_completion_length) (Liu et al. 2025)
    dapo     sum over all tokens / number of tokens in the whole global batch (Yu et al. 2025)

Multi-worker use: each worker holds a slice of the batch. Pass ``num_sequences_global`` /
``num_tokens_global`` (the counts over the whole optimizer step: all workers, all micro-batches) and the
returned loss is this slice's share, so that summing it over every micro-batch and worker gives exactly
the single-process loss of the whole batch. Backends that *average* gradients over workers (DDP, FSDP)
must multiply it by the world size (TRL and ms-swift divide the normaliser by ``num_processes`` for the
same reason).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # added to the std, as ms-swift and TRL do


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    """View ``rewards [N]`` as ``[N / G, G]``, with a clear error when the shapes do not fit."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} values, not a multiple of num_generations={num_generations}: "
            "each prompt's completions must sit next to each other, num_generations of them"
        )
    return rewards.view(-1, num_generations)


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group") -> Tensor:
    """GRPO advantages: reward minus its group mean, scaled by a std (``scale_rewards``).

    ``"group"`` divides by each group's std, ``"batch"`` by the std of all N rewards, ``"none"`` does not
    divide (Dr.GRPO). The std is unbiased (ddof=1); a group of one completion has std 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = _grouped(rewards, num_generations)
    advantages = rewards - grouped.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        if num_generations > 1:
            std = grouped.std(dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
    else:
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return advantages / (std + ADVANTAGE_EPS)


def dynamic_sample_filter(rewards: Tensor, num_generations: int) -> Tensor:
    """DAPO dynamic sampling: a bool mask ``[N]`` that keeps whole groups whose rewards are not all equal.

    A group whose completions all score the same has zero advantage everywhere and contributes no
    gradient. "All equal" is tested as max == min, exact, rather than std == 0, which rounding can miss.
    """
    grouped = _grouped(rewards, num_generations)
    varied = grouped.amax(dim=1) != grouped.amin(dim=1)
    return varied.repeat_interleave(num_generations)


def overlong_mask(completion_truncated: Tensor, completion_mask: Tensor | None = None) -> Tensor:
    """DAPO overlong filtering: zero loss weight for completions cut off at the length limit.

    Returns a bool mask ``[N]`` (True = keep), or, given a token ``completion_mask [N, T]``, that token mask
    with the truncated completions' rows cleared.
    """
    keep = ~completion_truncated.bool()
    if completion_mask is None:
        return keep
    if completion_mask.shape[0] != keep.shape[0]:
        raise ValueError(
            f"completion_mask has {completion_mask.shape[0]} rows but completion_truncated has {keep.shape[0]}"
        )
    return completion_mask.bool() & keep.unsqueeze(-1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - logp.

    d is clamped to [-20, 20] and the result to at most 10, as ms-swift does, so that one wild token
    cannot produce inf; inside those bounds this is the exact formula.
    """
    delta = torch.clamp(ref_logprobs - logprobs, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(delta) - delta - 1.0, max=10.0)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    ref_logprobs: Tensor | None = None,
    max_completion_length: int | None = None,
    num_sequences_global: int | None = None,
    num_tokens_global: int | float | None = None,
    entropies: Tensor | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped GRPO-family policy loss and its metrics.

    Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask``, ``entropies``: ``[B, T]`` over
    completion tokens; ``advantages``: ``[B]`` (one per sequence) or ``[B, T]``. ``old_logprobs=None``
    means the batch is on-policy (one iteration per rollout): the ratio is 1 with a live gradient.
    ``num_sequences_global`` overrides B (grpo, dr_grpo) and ``num_tokens_global`` the token count
    (bnpo, dapo); see the module docstring. Without them the counts of this (micro)batch are used.
    ``is_weights`` ``[B, T]`` (no gradient) multiply each token's policy-gradient term, not its KL term:
    the rollout correction of rollout_correction.py.

    Metrics (floats, over this batch's masked tokens): ``kl`` when beta != 0; ``clip_ratio/low_mean``
    (ratio < 1 - eps where A < 0), ``clip_ratio/high_mean`` (ratio > 1 + eps_high where A > 0),
    ``clip_ratio/region_mean`` (either); ``entropy/mean`` when ``entropies`` is given; ``num_tokens``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and mask must both be [B, T]; got {tuple(logprobs.shape)} and {tuple(mask.shape)}"
        )
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (the reference model's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")

    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask_f = mask.to(logprobs.dtype)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    if old_logprobs is None:
        old_logprobs = logprobs.detach()

    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = None
    if beta != 0.0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl

    masked = per_token * mask_f
    num_sequences = num_sequences_global if num_sequences_global is not None else logprobs.shape[0]
    if loss_type == "grpo":
        per_sequence = masked.sum(-1) / mask_f.sum(-1).clamp(min=1.0)
        loss = per_sequence.sum() / num_sequences
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (num_sequences * max_completion_length)
    else:  # bnpo and dapo differ only in which token count the caller passes (micro vs global batch)
        num_tokens = num_tokens_global if num_tokens_global is not None else mask_f.sum().clamp(min=1.0)
        loss = masked.sum() / num_tokens

    metrics = _loss_metrics(ratio, adv, mask_f, eps_low, eps_high, kl, entropies)
    return loss, metrics


@torch.no_grad()
def _loss_metrics(
    ratio: Tensor,
    adv: Tensor,
    mask_f: Tensor,
    eps_low: float,
    eps_high: float,
    kl: Tensor | None,
    entropies: Tensor | None,
) -> dict[str, float]:
    """Token-mean diagnostics of one loss call (ms-swift's metric names)."""
    count = mask_f.sum().clamp(min=1.0)

    def token_mean(x: Tensor) -> float:
        return float((x.to(mask_f.dtype) * mask_f).sum() / count)

    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics = {
        "clip_ratio/low_mean": token_mean(low),
        "clip_ratio/high_mean": token_mean(high),
        "clip_ratio/region_mean": token_mean(low | high),
        "num_tokens": float(mask_f.sum()),
    }
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    if entropies is not None:
        metrics["entropy/mean"] = token_mean(entropies)
    return metrics
