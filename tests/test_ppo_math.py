"""PPO numerics against plain-Python float64 re-statements of the formulas, on random right-padded batches.

The references below are written from the formulas (Schulman et al. 2016 for GAE, 2017 for the clipped
losses) and from TRL's PPOTrainer token layout, loop by loop, independently of ppo_math: in particular the
score position is found the way TRL finds it, from response token ids (first pad, "p1").
"""

import math
import random

import pytest
import torch

from swiftray.algorithms.ppo_math import (
    completion_lengths,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_var,
    masked_whiten,
    ppo_advantages,
    ppo_policy_loss,
    ppo_rollout_metrics,
    ppo_value_loss,
    score_positions,
    value_mask,
)

torch.set_num_threads(1)
PAD, EOS = 0, 1


# ---------------------------------------------------------------- random batches


def random_lengths(rng: random.Random, batch: int, width: int) -> list[int]:
    """Lengths in [0, width], with at least one full row and one short row when width allows."""
    lengths = [rng.randint(0, width) for _ in range(batch)]
    lengths[0] = width
    if batch > 1 and width > 1:
        lengths[1] = rng.randint(1, width - 1)
    rng.shuffle(lengths)
    return lengths


def mask_of(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[t < n for t in range(width)] for n in lengths])


def rand(rng: random.Random, batch: int, width: int, scale: float = 1.0) -> list[list[float]]:
    return [[rng.gauss(0.0, scale) for _ in range(width)] for _ in range(batch)]


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- references (plain Python, float64)


def trl_score_index(response_ids: list[int]) -> int:
    """TRL: sequence_length = first pad index - 1 (row length if no pad); the score goes at
    sequence_length + 1 when that is inside the row, else at sequence_length."""
    first_pad = next((i for i, tok in enumerate(response_ids) if tok == PAD), len(response_ids))
    seq_len = first_pad - 1
    return seq_len + 1 if seq_len + 1 < len(response_ids) else seq_len


def ref_rewards(scores, lp, ref, lengths, width, kl_coef, estimator, has_eos, penalty, last_token):
    rewards, kls = [], []
    for b, n in enumerate(lengths):
        score = scores[b] - (penalty if penalty is not None and not has_eos[b] else 0.0)
        row_r, row_kl = [], []
        for t in range(width):
            if t < n:
                d = ref[b][t] - lp[b][t]
                kl = -d if estimator == "k1" else math.exp(d) - 1 - d
            else:
                kl = 0.0
            row_kl.append(kl)
            row_r.append(-kl_coef * kl)
        ids = [7] * max(n - 1, 0) + ([EOS if has_eos[b] else 7] if n else []) + [PAD] * (width - n)
        pos = max(n - 1, 0) if last_token else trl_score_index(ids)
        row_r[pos] += score
        rewards.append(row_r)
        kls.append(row_kl)
    return rewards, kls


def ref_value_lengths(lengths, width, last_token):
    return [n if last_token else min(n + 1, width) for n in lengths]


def ref_gae_row(rewards, values, n, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, over the first n steps."""
    r = [rewards[t] if t < n else 0.0 for t in range(len(rewards))]
    v = [values[t] if t < n else 0.0 for t in range(len(values))]
    deltas = [r[t] + gamma * (v[t + 1] if t + 1 < len(v) else 0.0) - v[t] for t in range(len(r))]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(len(r) - t)) for t in range(len(r))]
    return adv, [adv[t] + v[t] for t in range(len(r))]


def ref_whiten(values, keep, shift_mean):
    xs = [values[b][t] for b in range(len(values)) for t in range(len(values[b])) if keep[b][t]]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    out = [
        [(x - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean) for x in row] for row in values
    ]
    return out


def ref_policy(lp, old, adv, keep, eps):
    """Per-token clipped loss, its d/d logp, and whether the clipped term is the larger."""
    loss, grad, clipped = [], [], []
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            if not keep[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            a = adv[b][t]
            unclip, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            loss.append(max(unclip, clip))
            clipped.append(clip > unclip)
            grad.append(-a * ratio if unclip >= clip else 0.0)
    return loss, grad, clipped


def ref_value(v, old, ret, keep, c):
    loss, grad, clipped = [], [], []
    for b in range(len(v)):
        for t in range(len(v[b])):
            if not keep[b][t]:
                continue
            lo, hi = old[b][t] - c, old[b][t] + c
            vc = min(max(v[b][t], lo), hi)
            e1, e2 = (v[b][t] - ret[b][t]) ** 2, (vc - ret[b][t]) ** 2
            loss.append(0.5 * max(e1, e2))
            clipped.append(e2 > e1)
            if e1 >= e2:
                grad.append(v[b][t] - ret[b][t])
            else:
                grad.append((vc - ret[b][t]) if lo < v[b][t] < hi else 0.0)
    return loss, grad, clipped


def mask_rows(lengths, width):
    return [[t < n for t in range(width)] for n in lengths]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("last_token", [False, True])
def test_rewards_match_trl_layout_with_kl_and_missing_eos(seed, last_token):
    rng = random.Random(seed)
    batch, width = rng.randint(2, 7), rng.randint(2, 9)
    lengths = random_lengths(rng, batch, width)
    # A completion shorter than the frame ended on EOS; a full one may or may not have.
    has_eos = [n < width or rng.random() < 0.5 for n in lengths]
    lp, ref = rand(rng, batch, width), rand(rng, batch, width)
    scores = [rng.gauss(0, 2) for _ in range(batch)]
    kl_coef, penalty = rng.uniform(0.01, 0.5), rng.choice([None, 1.5])
    for estimator in ("k1", "k3"):
        rewards, kl, out_scores = kl_penalized_rewards(
            t64(scores),
            t64(lp),
            t64(ref),
            mask_of(lengths, width),
            kl_coef=kl_coef,
            kl_estimator=estimator,
            contains_eos=torch.tensor(has_eos),
            missing_eos_penalty=penalty,
            score_on_last_token=last_token,
        )
        want_r, want_kl = ref_rewards(
            scores, lp, ref, lengths, width, kl_coef, estimator, has_eos, penalty, last_token
        )
        assert torch.allclose(rewards, t64(want_r), atol=1e-12)
        assert torch.allclose(kl, t64(want_kl), atol=1e-12)
        penalised = [s - (penalty if penalty is not None and not e else 0.0) for s, e in zip(scores, has_eos)]
        assert torch.allclose(out_scores, t64(penalised))


def test_score_position_and_value_mask_edge_cases():
    mask = mask_of([3, 5, 0, 1], 5)
    assert score_positions(mask).tolist() == [3, 4, 0, 1]  # one past the end; the full row keeps its last
    assert score_positions(mask, score_on_last_token=True).tolist() == [2, 4, 0, 0]
    assert value_mask(mask).sum(-1).tolist() == [4, 5, 1, 2]
    assert torch.equal(value_mask(mask, score_on_last_token=True)[:2], mask[:2])
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        completion_lengths(torch.tensor([[1, 1, 0], [0, 1, 1]]))


@pytest.mark.parametrize("seed", range(8))
def test_gae_matches_discounted_sum_of_td_errors(seed):
    rng = random.Random(seed)
    batch, width = rng.randint(1, 6), rng.randint(1, 10)
    lengths = random_lengths(rng, batch, width)
    rewards, values = rand(rng, batch, width), rand(rng, batch, width)
    gamma, lam = rng.choice([1.0, rng.uniform(0.8, 1.0)]), rng.uniform(0.0, 1.0)
    adv, ret = gae(t64(rewards), t64(values), mask_of(lengths, width), gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        want_adv, want_ret = ref_gae_row(rewards[b], values[b], n, gamma, lam)
        assert torch.allclose(adv[b], t64(want_adv), atol=1e-10)
        assert torch.allclose(ret[b], t64(want_ret), atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_whitening_matches_masked_mean_and_unbiased_var(seed):
    rng = random.Random(seed)
    batch, width = rng.randint(2, 6), rng.randint(2, 8)
    lengths = random_lengths(rng, batch, width)
    values = rand(rng, batch, width, scale=3.0)
    keep = mask_rows(lengths, width)
    for shift_mean in (True, False):
        got = masked_whiten(t64(values), mask_of(lengths, width), shift_mean=shift_mean)
        assert torch.allclose(got, t64(ref_whiten(values, keep, shift_mean)), atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t64([[1.0, 2.0]]), torch.tensor([[True, False]]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_advantages_whiten_gae_returns(seed, whiten_rewards):
    rng = random.Random(seed)
    batch, width = rng.randint(2, 6), rng.randint(2, 8)
    lengths = random_lengths(rng, batch, width)
    rewards, values = rand(rng, batch, width), rand(rng, batch, width)
    gamma, lam = rng.uniform(0.9, 1.0), rng.uniform(0.5, 1.0)
    adv, ret = ppo_advantages(
        t64(rewards),
        t64(values),
        mask_of(lengths, width),
        gamma=gamma,
        lam=lam,
        whiten_rewards=whiten_rewards,
    )
    vlens = ref_value_lengths(lengths, width, last_token=False)
    vkeep = mask_rows(vlens, width)
    if whiten_rewards:
        rewards = ref_whiten(rewards, vkeep, shift_mean=False)
        rewards = [[r if k else 0.0 for r, k in zip(row, krow)] for row, krow in zip(rewards, vkeep)]
    raw_adv, want_ret = [], []
    for b in range(batch):
        a, r = ref_gae_row(rewards[b], values[b], vlens[b], gamma, lam)
        raw_adv.append(a)
        want_ret.append(r)
    keep = mask_rows(lengths, width)
    want_adv = ref_whiten(raw_adv, keep, shift_mean=True)
    want_adv = [[a if k else 0.0 for a, k in zip(row, krow)] for row, krow in zip(want_adv, keep)]
    assert torch.allclose(adv, t64(want_adv), atol=1e-9)
    assert torch.allclose(ret, t64(want_ret), atol=1e-10)


@pytest.mark.parametrize("seed", range(8))
def test_policy_loss_value_gradient_and_metrics(seed):
    rng = random.Random(seed)
    batch, width = rng.randint(1, 6), rng.randint(1, 8)
    lengths = random_lengths(rng, batch, width)
    lengths[0] = max(lengths[0], 1)
    keep = mask_rows(lengths, width)
    lp, adv = rand(rng, batch, width), rand(rng, batch, width)
    old = [[x + rng.gauss(0, 0.3) for x in row] for row in lp]
    eps = rng.uniform(0.05, 0.3)
    logprobs = t64(lp).requires_grad_(True)
    entropies = t64(rand(rng, batch, width))
    loss, metrics = ppo_policy_loss(
        logprobs, t64(old), t64(adv), mask_of(lengths, width), cliprange=eps, entropies=entropies
    )
    loss.backward()
    per_token, grads, clipped = ref_policy(lp, old, adv, keep, eps)
    n = len(per_token)
    assert float(loss.detach()) == pytest.approx(sum(per_token) / n, abs=1e-12)
    want_grad = [[0.0] * width for _ in range(batch)]
    it = iter(grads)
    for b in range(batch):
        for t in range(width):
            if keep[b][t]:
                want_grad[b][t] = next(it) / n
    assert torch.allclose(logprobs.grad, t64(want_grad), atol=1e-12)
    assert metrics["policy/clipfrac_avg"] == pytest.approx(sum(clipped) / n)
    kls = [0.5 * (lp[b][t] - old[b][t]) ** 2 for b in range(batch) for t in range(width) if keep[b][t]]
    assert metrics["policy/approxkl_avg"] == pytest.approx(sum(kls) / n)
    ents = [float(entropies[b, t]) for b in range(batch) for t in range(width) if keep[b][t]]
    assert metrics["policy/entropy_avg"] == pytest.approx(sum(ents) / n)


@pytest.mark.parametrize("seed", range(8))
def test_value_loss_gradient_clipfrac_and_explained_variance(seed):
    rng = random.Random(seed)
    batch, width = rng.randint(1, 6), rng.randint(2, 8)
    lengths = ref_value_lengths(random_lengths(rng, batch, width), width, last_token=False)
    keep = mask_rows(lengths, width)
    old, ret = rand(rng, batch, width), rand(rng, batch, width)
    v = [[x + rng.gauss(0, 0.4) for x in row] for row in old]
    c, vf_coef = rng.uniform(0.05, 0.4), rng.uniform(0.05, 1.0)
    values = t64(v).requires_grad_(True)
    loss, metrics = ppo_value_loss(
        values, t64(old), t64(ret), mask_of(lengths, width), cliprange_value=c, vf_coef=vf_coef
    )
    loss.backward()
    per_token, grads, clipped = ref_value(v, old, ret, keep, c)
    n = len(per_token)
    assert float(loss.detach()) == pytest.approx(vf_coef * sum(per_token) / n, abs=1e-12)
    assert metrics["loss/value_avg"] == pytest.approx(sum(per_token) / n)
    assert metrics["val/clipfrac_avg"] == pytest.approx(sum(clipped) / n)
    want_grad = [[0.0] * width for _ in range(batch)]
    it = iter(grads)
    for b in range(batch):
        for t in range(width):
            if keep[b][t]:
                want_grad[b][t] = vf_coef * next(it) / n
    assert torch.allclose(values.grad, t64(want_grad), atol=1e-12)
    rs = [ret[b][t] for b in range(batch) for t in range(width) if keep[b][t]]
    diffs = [ret[b][t] - v[b][t] for b in range(batch) for t in range(width) if keep[b][t]]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    assert metrics["val/explained_variance"] == pytest.approx(1 - var(diffs) / var(rs), abs=1e-10)


def test_explained_variance_of_a_perfect_and_a_constant_critic():
    returns = t64([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


@pytest.mark.parametrize("seed", range(4))
def test_micro_batch_shares_sum_to_the_whole_batch_loss_and_gradient(seed):
    """Split over 2 ranks x 2 micro-batches with num_tokens_global: the sum is the one-process loss."""
    rng = random.Random(seed)
    batch, width = 8, rng.randint(2, 7)
    lengths = [max(1, n) for n in random_lengths(rng, batch, width)]
    mask = mask_of(lengths, width)
    lp, adv, old = t64(rand(rng, batch, width)), t64(rand(rng, batch, width)), t64(rand(rng, batch, width))
    whole_lp = lp.clone().requires_grad_(True)
    whole, _ = ppo_policy_loss(whole_lp, old, adv, mask, cliprange=0.2)
    whole.backward()
    split_lp = lp.clone().requires_grad_(True)
    total = sum(
        ppo_policy_loss(split_lp[rows], old[rows], adv[rows], mask[rows], num_tokens_global=int(mask.sum()))[
            0
        ]
        for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8))
    )
    total.backward()
    assert float(total.detach()) == pytest.approx(float(whole.detach()), abs=1e-12)
    assert torch.allclose(split_lp.grad, whole_lp.grad, atol=1e-12)

    vmask = value_mask(mask)
    v, old_v, ret = t64(rand(rng, batch, width)), t64(rand(rng, batch, width)), t64(rand(rng, batch, width))
    whole_v, _ = ppo_value_loss(v, old_v, ret, vmask)
    parts = sum(
        ppo_value_loss(v[r], old_v[r], ret[r], vmask[r], num_tokens_global=int(vmask.sum()))[0]
        for r in (slice(0, 3), slice(3, 8))
    )
    assert float(parts) == pytest.approx(float(whole_v), abs=1e-12)


def test_on_policy_ratio_is_one_with_live_gradient_and_padding_filler_is_ignored():
    mask = torch.tensor([[True, True, False]])
    lp = torch.tensor([[-1.0, -2.0, 1.0]], requires_grad=True)  # TRL fills padding with 1.0
    adv = torch.tensor([[2.0, -1.0, 5.0]])
    loss, metrics = ppo_policy_loss(lp, None, adv, mask)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-(2.0 - 1.0) / 2)
    assert lp.grad.tolist() == [[-1.0, 0.5, 0.0]]
    assert metrics["val/ratio"] == pytest.approx(1.0) and metrics["policy/clipfrac_avg"] == 0.0


def test_rollout_metrics_and_bad_input():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    kl = t64([[0.5, 0.25, 9.0], [1.0, 9.0, 9.0]])
    lp = t64([[-1.0, -2.0, 1.0], [-0.5, 1.0, 1.0]])
    metrics = ppo_rollout_metrics(
        t64([1.0, 3.0]), kl, lp, mask, kl_coef=0.1, contains_eos=torch.tensor([1, 0])
    )
    assert metrics["objective/kl"] == pytest.approx((0.75 + 1.0) / 2)
    assert metrics["objective/entropy"] == pytest.approx((3.0 + 0.5) / 2)
    assert metrics["objective/rlhf_reward"] == pytest.approx(-0.1 * 0.875 + 2.0)
    assert metrics["val/num_eos_tokens"] == 1
    with pytest.raises(ValueError, match="missing_eos_penalty needs contains_eos"):
        kl_penalized_rewards(t64([1.0, 2.0]), lp, lp, mask, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kl_penalized_rewards(t64([1.0, 2.0]), lp, lp, mask, kl_estimator="k2")
    with pytest.raises(ValueError, match=r"scores must be \[B\]"):
        kl_penalized_rewards(t64([1.0]), lp, lp, mask)
