"""The numerics of PPO with a critic (Schulman et al. 2017, as RLHF uses it): KL-penalised token rewards,
GAE, whitening, the clipped policy and value losses, and their metrics.

Pure tensor functions with no knowledge of Ray, models or devices. Semantics follow ms-swift's PPO, which
is TRL's ``PPOTrainer`` run unchanged (ms-swift only subclasses it for saving and data loading), so the
formulas, defaults and metric names below are TRL's:

- Frame: every ``[B, T]`` tensor here is over *completion* tokens, right-padded: row ``b`` holds its
  ``L_b`` completion tokens (the stop token included when there is one) at positions ``0 .. L_b - 1``.
  ``values[b, t]`` is the critic's value of the state *before* token ``t``; ``logprobs[b, t]`` that
  token's log-prob. TRL's ``T`` is the longest completion in the rollout batch, which matters for the
  score position below.
- Token reward: ``r_t = -kl_coef * KL_t`` with ``KL_t = logp_t - ref_t`` (k1, TRL's default) or
  ``exp(ref_t - logp_t) - 1 - (ref_t - logp_t)`` (k3), zero past the completion. The sequence's score
  (reward model or rule rewards, minus ``missing_eos_penalty`` when the completion has no EOS) is added
  at position ``L_b`` -- one past the last token, the first pad slot -- when ``L_b < T``, and at the last
  token ``L_b - 1`` otherwise (a completion that fills the frame). That is TRL's placement (its
  ``sequence_lengths_p1``; see huggingface/trl issue 3750): the critic is trained on that extra position
  too, and the score reaches the last token's advantage through ``gamma * lam``. ``score_on_last_token``
  puts it on the last token instead (the placement of "The N+ Implementation Details of RLHF with PPO"),
  with the value mask equal to the completion mask. ms-swift has no flag for this; TRL's is the default.
- Masks: the policy loss, advantage whitening and approx-KL use the completion mask; the value loss,
  value clip fraction, reward whitening and explained variance use the *value mask* (``value_mask``):
  the completion mask plus the score position.
- Advantages: GAE (Schulman et al. 2016) over the whole frame, ``delta_t = r_t + gamma V_{t+1} - V_t``,
  ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and ``r`` zero outside the value mask;
  ``returns = A + V`` (before whitening); then ``A`` is whitened over the completion tokens.
- Whitening (TRL's ``masked_whiten``): ``(x - mean) / sqrt(var + 1e-8)`` with the masked mean and the
  unbiased (n - 1) masked variance; ``shift_mean=False`` adds the mean back (rewards keep their level).
- Losses: policy ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(logp - old)``; value
  ``0.5 * max((v - R)^2, (clip(v, old_v - c, old_v + c) - R)^2)``; each a masked token mean. TRL adds
  them as ``pg_loss + vf_coef * vf_loss`` for its one optimizer over policy and value head.

Multi-worker use. Whitening is a statistic of the batch it is given: call the advantage functions once,
on the driver, over the whole rollout batch (TRL with several processes whitens each process's share
separately; one process is what this reproduces). The losses are per micro-batch. Without
``num_tokens_global`` a loss is this micro-batch's masked mean, which is TRL's per-micro-batch loss;
accelerate then divides it by the gradient-accumulation steps and DDP averages over ranks, so TRL's
step is the mean of the N ranks x M micro-batches' means (backends that *sum* gradients divide by
N x M to match). With ``num_tokens_global`` (the masked token count of the whole optimizer step: all
ranks, all micro-batches; the value loss takes the value-mask count) the loss is this micro-batch's
share -- masked sum / global count -- so the sum over every micro-batch and rank is the single-process
token mean of the step; backends that *average* over ranks multiply it by the world size (the same
convention as ``grpo_math``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")
WHITEN_EPS = 1e-8  # added to the variance, as TRL's masked_whiten does


# ---------------------------------------------------------------- masked statistics


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is set (over all elements, or along ``dim``).

    Unmasked entries are replaced, not multiplied, so that a nan or inf there cannot leak in.
    """
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        return kept.sum() / mask.sum()
    return kept.sum(dim) / mask.sum(dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries; ``unbiased`` divides by n - 1 (TRL's default)."""
    count = int(mask.bool().sum())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(
            f"masked_var needs {'at least 2' if unbiased else 'at least 1'} masked values, got {count}: "
            "whiten over a larger batch (more completions per step)"
        )
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return var * (count / (count - 1)) if unbiased else var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """TRL's ``masked_whiten``: ``(x - mean) * rsqrt(var + 1e-8)``, plus the mean again when
    ``shift_mean`` is False. Statistics over the masked entries; every entry is transformed (callers
    zero the unmasked ones)."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var[returns - values] / Var[returns]`` over the masked tokens (nan when the returns are
    constant). 1 is a perfect critic, 0 no better than a constant, negative worse than one."""
    var_returns = masked_var(returns.detach(), mask, unbiased=False)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var((returns - values).detach(), mask, unbiased=False) / var_returns)


# ---------------------------------------------------------------- the token frame


def completion_lengths(completion_mask: Tensor) -> Tensor:
    """``L_b`` per row of a right-padded completion mask ``[B, T]``, checking that it is right-padded."""
    if completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must be [B, T], got shape {tuple(completion_mask.shape)}")
    mask = completion_mask.bool()
    lengths = mask.sum(-1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions < lengths.unsqueeze(-1)):
        bad = int((mask != (positions < lengths.unsqueeze(-1))).any(-1).nonzero()[0])
        raise ValueError(
            f"completion_mask row {bad} is not right-padded (its tokens must be positions 0..L-1): "
            "pass the completion-only frame, not the prompt+completion one"
        )
    return lengths


def score_positions(completion_mask: Tensor, score_on_last_token: bool = False) -> Tensor:
    """Where each row's score goes (``[B]`` long): TRL's ``L_b`` when ``L_b < T``, else ``L_b - 1``;
    ``L_b - 1`` always with ``score_on_last_token``. A row with no completion tokens gets position 0."""
    lengths = completion_lengths(completion_mask)
    width = completion_mask.shape[1]
    if score_on_last_token:
        return (lengths - 1).clamp(min=0)
    return torch.where(lengths < width, lengths, lengths - 1).clamp(min=0)


def value_mask(completion_mask: Tensor, score_on_last_token: bool = False) -> Tensor:
    """The tokens the critic is trained on (bool ``[B, T]``): the completion mask plus the score
    position (TRL's ``~padding_mask_p1``)."""
    mask = completion_mask.bool().clone()
    if completion_mask.shape[1] == 0:
        return mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    mask[rows, score_positions(completion_mask, score_on_last_token)] = True
    return mask


# ---------------------------------------------------------------- rewards and advantages


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kl_estimator: KLEstimator = "k1") -> Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens (Schulman's k1 or k3), unclamped
    as TRL computes it: k1 ``logp - ref``, k3 ``exp(ref - logp) - 1 - (ref - logp)``."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    log_ratio = ref_logprobs - logprobs
    if kl_estimator == "k1":
        return -log_ratio
    return torch.expm1(log_ratio) - log_ratio


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    completion_mask: Tensor,
    *,
    kl_coef: float = 0.05,
    kl_estimator: KLEstimator = "k1",
    contains_eos: Tensor | None = None,
    missing_eos_penalty: float | None = None,
    score_on_last_token: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's per-token rewards: ``-kl_coef * KL`` on the completion tokens plus the score at the score
    position (module docstring), zero elsewhere.

    ``scores [B]``: one reward per completion. ``contains_eos [B]`` (bool): whether the completion ended
    with the stop token; required with ``missing_eos_penalty``, which is subtracted from the scores of
    completions without one (TRL: it must be positive). Returns ``(rewards [B, T], kl [B, T],
    scores [B])``: the rewards, the per-token KL (zero off the completion) and the scores after the
    penalty, for ``ppo_rollout_metrics``.
    """
    if logprobs.dim() != 2 or ref_logprobs.shape != logprobs.shape or completion_mask.shape != logprobs.shape:
        raise ValueError(
            "logprobs, ref_logprobs and completion_mask must all be [B, T]; got "
            f"{tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(completion_mask.shape)}"
        )
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(f"scores must be [B] = [{logprobs.shape[0]}], got shape {tuple(scores.shape)}")
    scores = scores.to(logprobs.dtype)
    if missing_eos_penalty is not None:
        if contains_eos is None:
            raise ValueError(
                "missing_eos_penalty needs contains_eos (whether each completion has a stop token)"
            )
        scores = torch.where(contains_eos.bool(), scores, scores - missing_eos_penalty)
    mask = completion_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, kl_estimator), zero)
    rewards = -kl_coef * kl
    if rewards.shape[1] > 0:
        rows = torch.arange(rewards.shape[0], device=rewards.device)
        rewards[rows, score_positions(completion_mask, score_on_last_token)] += scores
    return rewards, kl, scores


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[B, T]`` with ``rewards`` and ``values`` zero outside
    ``mask`` (right-padded: a row's episode ends where its mask does, and ``V`` past the end is 0).

    Returns ``(advantages, returns)`` with ``returns = advantages + values``, both zero off the mask.
    """
    if rewards.shape != values.shape or mask.shape != rewards.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must all be [B, T]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards, zero)
    values = torch.where(mask, values.to(rewards.dtype), zero)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0]) if rewards.shape[1] else None
    next_advantage = torch.zeros_like(next_value) if next_value is not None else None
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def ppo_advantages(
    rewards: Tensor,
    values: Tensor,
    completion_mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    score_on_last_token: bool = False,
) -> tuple[Tensor, Tensor]:
    """TRL's steps 5-6: optional reward whitening, GAE, returns, advantage whitening.

    ``rewards`` from ``kl_penalized_rewards``; ``values [B, T]`` the critic's rollout-time values
    (``values[b, L_b]``, the state after the last token, is used when ``L_b < T`` and the score sits
    there). ``whiten_rewards`` whitens the rewards over the value mask keeping their mean. Returns
    ``(advantages, returns)``: advantages whitened over the completion tokens and zero elsewhere,
    returns (the value targets) zero off the value mask.
    """
    vmask = value_mask(completion_mask, score_on_last_token)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    if whiten_rewards:
        rewards = torch.where(vmask, masked_whiten(rewards, vmask, shift_mean=False), zero)
    advantages, returns = gae(rewards, values, vmask, gamma=gamma, lam=lam)
    cmask = completion_mask.bool()
    advantages = torch.where(cmask, masked_whiten(advantages, cmask), zero)
    return advantages, returns


# ---------------------------------------------------------------- losses


def _token_normaliser(mask: Tensor, num_tokens_global: int | float | None) -> Tensor | float:
    if num_tokens_global is not None:
        if num_tokens_global <= 0:
            raise ValueError(f"num_tokens_global must be positive, got {num_tokens_global}")
        return num_tokens_global
    return mask.sum().clamp(min=1)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    cliprange: float = 0.2,
    num_tokens_global: int | float | None = None,
    entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped PPO surrogate over the completion tokens (``[B, T]`` each).

    ``old_logprobs=None`` means on-policy (ratio 1 with a live gradient). See the module docstring for
    ``num_tokens_global``. Metrics, TRL's names, over this micro-batch's tokens: ``loss/policy_avg``,
    ``policy/clipfrac_avg`` (share of tokens where the clipped term is the larger loss),
    ``policy/approxkl_avg`` (``0.5 * mean((logp - old)^2)``), ``val/ratio`` (mean ratio),
    ``policy/entropy_avg`` when ``entropies`` is given. TRL averages approx-KL, ratio and entropy over
    the padded positions as well; here they are masked means.
    """
    if logprobs.dim() != 2 or completion_mask.shape != logprobs.shape or advantages.shape != logprobs.shape:
        raise ValueError(
            "logprobs, advantages and completion_mask must all be [B, T]; got "
            f"{tuple(logprobs.shape)}, {tuple(advantages.shape)}, {tuple(completion_mask.shape)}"
        )
    mask = completion_mask.bool()
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Off-mask positions may hold anything (TRL puts 1.0 there); zero their log-ratio so exp stays finite.
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.where(mask, torch.max(unclipped, clipped), zero)
    loss = per_token.sum() / _token_normaliser(mask, num_tokens_global)

    with torch.no_grad():
        metrics = {
            "loss/policy_avg": float(masked_mean(per_token, mask)) if mask.any() else 0.0,
            "policy/clipfrac_avg": _mean_or_zero((clipped > unclipped).to(logprobs.dtype), mask),
            "policy/approxkl_avg": _mean_or_zero(0.5 * log_ratio**2, mask),
            "val/ratio": _mean_or_zero(ratio, mask),
            "num_tokens": float(mask.sum()),
        }
        if entropies is not None:
            metrics["policy/entropy_avg"] = _mean_or_zero(entropies, mask)
    return loss, metrics


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    value_mask: Tensor,
    *,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    num_tokens_global: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped value loss, ``vf_coef * 0.5 * mean(max((v - R)^2, (clip(v, old +- c) - R)^2))`` over
    the value mask (``[B, T]`` each; ``old_values`` the rollout-time values, ``returns`` from
    ``ppo_advantages``).

    The returned loss includes ``vf_coef`` (TRL's total is ``pg_loss + vf_coef * vf_loss``); with the
    critic in its own optimizer, as here, ``vf_coef`` only scales the critic's gradient, which Adam
    largely undoes, but gradient clipping does not. Metrics: ``loss/value_avg`` (the unscaled
    ``0.5 * mean``, TRL's), ``val/clipfrac_avg`` (share of tokens where the clipped error is the larger),
    ``val/explained_variance`` of ``values`` against ``returns``, ``val/vpred`` (mean predicted value).
    """
    if values.dim() != 2 or not (old_values.shape == returns.shape == value_mask.shape == values.shape):
        raise ValueError(
            "values, old_values, returns and value_mask must all be [B, T]; got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(value_mask.shape)}"
        )
    mask = value_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = torch.where(mask, 0.5 * torch.max(error, clipped_error), zero)
    loss = vf_coef * per_token.sum() / _token_normaliser(mask, num_tokens_global)

    with torch.no_grad():
        metrics = {
            "loss/value_avg": _mean_or_zero(per_token, mask),
            "val/clipfrac_avg": _mean_or_zero((clipped_error > error).to(values.dtype), mask),
            "val/vpred": _mean_or_zero(values, mask),
            "num_value_tokens": float(mask.sum()),
        }
        if int(mask.sum()) >= 1:
            metrics["val/explained_variance"] = explained_variance(values, returns, mask)
    return loss, metrics


def _mean_or_zero(values: Tensor, mask: Tensor) -> float:
    return float(masked_mean(values, mask)) if mask.any() else 0.0


# ---------------------------------------------------------------- rollout metrics


@torch.no_grad()
def ppo_rollout_metrics(
    scores: Tensor,
    kl: Tensor,
    logprobs: Tensor,
    completion_mask: Tensor,
    *,
    kl_coef: float,
    contains_eos: Tensor | None = None,
) -> dict[str, float]:
    """TRL's per-step objective metrics from one rollout batch: ``objective/kl`` (per-sequence sum of the
    token KL, averaged), ``objective/entropy`` (per-sequence sum of ``-logp``), ``objective/non_score_reward``
    (``-kl_coef`` times the former), ``objective/rlhf_reward`` (that plus the mean score),
    ``objective/scores``, and ``val/num_eos_tokens`` when ``contains_eos`` is given. Sums are over the
    completion tokens (TRL's entropy also counts its 1.0 pad filler; this does not)."""
    mask = completion_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl_sum = torch.where(mask, kl, zero).sum(-1).mean()
    non_score = -kl_coef * kl_sum
    metrics = {
        "objective/kl": float(kl_sum),
        "objective/entropy": float(torch.where(mask, -logprobs, zero).sum(-1).mean()),
        "objective/non_score_reward": float(non_score),
        "objective/rlhf_reward": float(non_score + scores.mean()),
        "objective/scores": float(scores.mean()),
    }
    if contains_eos is not None:
        metrics["val/num_eos_tokens"] = float(contains_eos.bool().sum())
    return metrics
