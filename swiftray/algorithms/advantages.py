"""GRPO's other advantage estimators (ms-swift's ``--advantage_estimator rloo|reinforce_plus_plus``) and
the KL-in-reward term that goes with them; plus the token-level REINFORCE++ of OpenRLHF and verl.

Pure tensor functions, no Ray. Rewards of one prompt's ``num_generations`` (K) completions sit next to
each other, as in ``grpo_math``. Call them on the driver over the whole step's rollouts (ms-swift
gathers the rewards of every process before computing advantages), so that group and batch statistics
are those of the whole batch.

ms-swift's semantics (``swift/rl_core/advantage.py``, ``compute_advantages``):

- ``grpo``: ``r - mean_group``, divided by a std per ``scale_rewards`` (``grpo_math.group_advantages``).
- ``rloo`` (Ahmadian et al. 2024): ``r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - mean_group)``; with
  ``scale_rewards`` group/batch it is divided by the std of the *rewards* (group or batch) + 1e-4, as
  GRPO. ms-swift's default for rloo is ``none``. K = 1 gives ``r - r = 0``.
- ``reinforce_plus_plus``: ms-swift's is REINFORCE++-baseline (Hu et al. 2025), sequence level:
  ``A = r - mean_group``, divided by the std of the *advantages* ``A`` over the whole batch (default
  ``scale_rewards=batch``) or per group (``group``), + 1e-4. There is no discount and no token-level
  return; K = 1 gives all-zero advantages.
- KL: ``--kl_in_reward`` (default false for grpo, true for rloo and reinforce_plus_plus) subtracts
  ``beta * KL_seq`` from each completion's reward *before* the estimator, where ``KL_seq`` is the sum
  over its completion tokens of ``old_logp - ref_logp`` (k1; ``sequence_kl``), and the loss then has no
  KL term. With ``kl_in_reward`` false the KL stays a ``beta``-weighted k3 term in the loss
  (``grpo_math.policy_loss``). ``beta`` is GRPO's ``--beta`` (0.04).

The token-level REINFORCE++ (OpenRLHF's ``reinforce``/``reinforce_baseline``, verl's
``reinforce_plus_plus``) is ``reinforce_plus_plus_token_advantages``: per-token rewards
``-kl_coef * KL_t`` with the score on the last completion token, discounted returns
``G_t = r_t + gamma * G_{t+1}``, then whitened over every completion token of the batch. ms-swift does
not offer it; it is here for a ``--advantage_estimator`` that wants OpenRLHF's behaviour.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from swiftray.algorithms.grpo_math import ADVANTAGE_EPS, SCALE_REWARDS, _grouped, group_advantages
from swiftray.algorithms.ppo_math import completion_lengths, masked_whiten

AdvantageEstimator = Literal["grpo", "rloo", "reinforce_plus_plus"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_plus_plus")


def default_scale_rewards(advantage_estimator: str) -> str:
    """ms-swift's ``--scale_rewards`` default for an estimator: group (grpo), none (rloo), batch (reinforce++)."""
    _check_estimator(advantage_estimator)
    return {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}[advantage_estimator]


def default_kl_in_reward(advantage_estimator: str) -> bool:
    """ms-swift's ``--kl_in_reward`` default: false for grpo, true for rloo and reinforce_plus_plus."""
    _check_estimator(advantage_estimator)
    return advantage_estimator != "grpo"


def _check_estimator(advantage_estimator: str) -> None:
    if advantage_estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {advantage_estimator!r}"
        )


def _check_scale(scale_rewards: str) -> None:
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")


def _group_std(values: Tensor, num_generations: int) -> Tensor:
    """Each group's unbiased std, repeated per member; 0 for groups of one."""
    if num_generations < 2:
        return torch.zeros_like(values)
    return values.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations)


def _batch_std(values: Tensor) -> Tensor:
    return values.std().expand_as(values) if values.numel() > 1 else torch.zeros_like(values)


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, completion_mask: Tensor) -> Tensor:
    """ms-swift's ``kl_values`` for ``kl_in_reward``: per completion, the sum over its tokens of
    ``logp - ref_logp`` (k1), ``[B]``. ``logprobs`` are the rollout policy's (old) log-probs, ``[B, T]``."""
    if not (logprobs.shape == ref_logprobs.shape == completion_mask.shape) or logprobs.dim() != 2:
        raise ValueError(
            "logprobs, ref_logprobs and completion_mask must all be [B, T]; got "
            f"{tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(completion_mask.shape)}"
        )
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return torch.where(completion_mask.bool(), logprobs - ref_logprobs, zero).sum(-1)


def rloo_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "none") -> Tensor:
    """RLOO: each reward minus the mean of the other K - 1 rewards of its prompt, optionally divided by
    the rewards' group or batch std (+1e-4) as ms-swift does for ``scale_rewards`` group/batch."""
    _check_scale(scale_rewards)
    grouped = _grouped(rewards, num_generations)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    if num_generations > 1:
        advantages = (rewards - mean) * (num_generations / (num_generations - 1))
    else:
        advantages = rewards - mean
    if scale_rewards == "none":
        return advantages
    std = _group_std(rewards, num_generations) if scale_rewards == "group" else _batch_std(rewards)
    return advantages / (std + ADVANTAGE_EPS)


def reinforce_plus_plus_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: str = "batch"
) -> Tensor:
    """ms-swift's REINFORCE++(-baseline): ``r - mean_group``, divided by the std of those differences
    over the batch (``batch``) or the group (``group``), + 1e-4; ``none`` leaves them unscaled."""
    _check_scale(scale_rewards)
    grouped = _grouped(rewards, num_generations)
    advantages = rewards - grouped.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "none":
        return advantages
    std = _group_std(advantages, num_generations) if scale_rewards == "group" else _batch_std(advantages)
    return advantages / (std + ADVANTAGE_EPS)


def estimator_advantages(
    rewards: Tensor,
    num_generations: int,
    advantage_estimator: AdvantageEstimator = "grpo",
    scale_rewards: str | None = None,
    *,
    kl_values: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """ms-swift's ``compute_advantages`` for one weighted reward per completion.

    ``scale_rewards=None`` takes the estimator's default. ``kl_values [N]`` (``sequence_kl``), given
    when ``kl_in_reward`` is on, are subtracted as ``beta * kl_values`` before the estimator; pass None
    otherwise. Returns ``(advantages, rewards)``, the rewards after the KL term (ms-swift logs those).
    """
    _check_estimator(advantage_estimator)
    scale = default_scale_rewards(advantage_estimator) if scale_rewards is None else scale_rewards
    if kl_values is not None and beta != 0.0:
        if kl_values.shape != rewards.shape:
            raise ValueError(
                f"kl_values must match rewards [N]; got {tuple(kl_values.shape)} and {tuple(rewards.shape)}"
            )
        rewards = rewards - beta * kl_values.to(rewards.dtype)
    if advantage_estimator == "rloo":
        return rloo_advantages(rewards, num_generations, scale), rewards
    if advantage_estimator == "reinforce_plus_plus":
        return reinforce_plus_plus_advantages(rewards, num_generations, scale), rewards
    return group_advantages(rewards, num_generations, scale), rewards


# ---------------------------------------------------------------- token-level REINFORCE++ (OpenRLHF, verl)


def discounted_returns(token_rewards: Tensor, completion_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` within each right-padded row, zero past its end (``[B, T]``)."""
    if token_rewards.shape != completion_mask.shape or token_rewards.dim() != 2:
        raise ValueError(
            f"token_rewards and completion_mask must both be [B, T]; got {tuple(token_rewards.shape)} "
            f"and {tuple(completion_mask.shape)}"
        )
    mask = completion_mask.bool()
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    rewards = torch.where(mask, token_rewards, zero)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0]) if rewards.shape[1] else None
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(mask, returns, zero)


def reinforce_plus_plus_token_advantages(
    scores: Tensor,
    completion_mask: Tensor,
    *,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    num_generations: int | None = None,
) -> tuple[Tensor, Tensor]:
    """OpenRLHF/verl REINFORCE++: token rewards ``-kl_coef * kl`` plus the score on each completion's last
    token, discounted returns, whitened over all completion tokens of the batch (TRL/verl
    ``masked_whiten``: unbiased variance, +1e-8; OpenRLHF divides by n and clamps the variance at 1e-8).

    ``scores [B]``; ``kl [B, T]`` per-token KL estimates (e.g. ``ppo_math.kl_penalty``), needed when
    ``kl_coef`` is not 0; ``num_generations`` subtracts each group's mean score first (the ``-baseline``
    variant). A row with no completion tokens gets nothing. Returns ``(advantages, returns)``, zero off
    the mask.
    """
    lengths = completion_lengths(completion_mask)
    if scores.shape != lengths.shape:
        raise ValueError(f"scores must be [B] = [{lengths.shape[0]}], got shape {tuple(scores.shape)}")
    if num_generations is not None:
        grouped = _grouped(scores, num_generations)
        scores = scores - grouped.mean(dim=1).repeat_interleave(num_generations)
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    token_rewards = torch.zeros(completion_mask.shape, dtype=dtype, device=scores.device)
    if kl_coef != 0.0:
        if kl is None or kl.shape != completion_mask.shape:
            raise ValueError(f"kl_coef={kl_coef} needs kl of shape {tuple(completion_mask.shape)}")
        token_rewards = token_rewards - kl_coef * kl.to(dtype)
    has_tokens = lengths > 0
    rows = torch.arange(lengths.shape[0], device=lengths.device)[has_tokens]
    token_rewards[rows, lengths[has_tokens] - 1] += scores[has_tokens].to(dtype)
    returns = discounted_returns(token_rewards, completion_mask, gamma)
    mask = completion_mask.bool()
    zero = torch.zeros((), dtype=dtype, device=returns.device)
    return torch.where(mask, masked_whiten(returns, mask), zero), returns
