"""GRPO/DAPO/Dr.GRPO numerics against plain-Python float64 re-statements of the papers' formulas.

The references below are written from the formulas, loop by loop, independently of grpo_math:
GRPO (Shao et al. 2024, eq. 3), DAPO (Yu et al. 2025, eq. 8: token-level sum over the whole batch),
Dr.GRPO (Liu et al. 2025: a constant normaliser, no std scaling).
"""

import math
import random

import pytest
import torch

from swiftray.algorithms.grpo_math import (
    dynamic_sample_filter,
    group_advantages,
    overlong_mask,
    policy_loss,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- references (plain Python, float64)


def ref_std(xs: list[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))


def ref_advantages(rewards: list[float], g: int, scale: str) -> list[float]:
    batch_std = ref_std(rewards)
    out = []
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        mean = sum(group) / g
        for r in group:
            if scale == "group":
                out.append((r - mean) / (ref_std(group) + 1e-4))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + 1e-4))
            else:
                out.append(r - mean)
    return out


def ref_token_loss(lp: float, old: float, ref: float, a: float, eps_lo: float, eps_hi: float, beta: float) -> float:
    ratio = math.exp(lp - old)
    clipped = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
    surrogate = min(ratio * a, clipped * a)
    kl = math.exp(ref - lp) - (ref - lp) - 1
    return -surrogate + beta * kl


def ref_loss(lp, old, ref, adv, mask, loss_type, eps_lo, eps_hi, beta, max_len, n_seq=None, n_tok=None) -> float:
    rows = []  # per sequence: the list of its masked token losses
    for i in range(len(lp)):
        rows.append(
            [
                ref_token_loss(lp[i][t], old[i][t], ref[i][t], adv[i], eps_lo, eps_hi, beta)
                for t in range(len(lp[i]))
                if mask[i][t]
            ]
        )
    total = sum(sum(r) for r in rows)
    tokens = sum(len(r) for r in rows)
    n_seq = n_seq if n_seq is not None else len(rows)
    if loss_type == "grpo":
        return sum(sum(r) / max(len(r), 1) for r in rows) / n_seq
    if loss_type == "bnpo":
        return total / (n_tok if n_tok is not None else tokens)
    if loss_type == "dr_grpo":
        return total / (n_seq * max_len)
    if loss_type == "dapo":
        return total / (n_tok if n_tok is not None else tokens)
    raise AssertionError(loss_type)


def random_batch(seed: int, b: int = 6, t: int = 7):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    old = lp + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.3  # ratios well outside [0.8, 1.2]
    ref = lp + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[0] = False  # one empty sequence: grpo must count it as a zero, not divide by zero
    mask[1, 0] = True
    return lp, old, ref, adv, mask


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_group_advantages_match_reference(scale, g):
    rng = random.Random(g)
    rewards = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(g * 5)]
    rewards[:g] = [1.0] * g  # one all-equal group: zero advantage, no division blow-up
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), g, scale)
    want = ref_advantages(rewards, g, scale)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert got[:g].abs().max() == 0


def test_group_advantages_known_values():
    # group [0, 1]: mean 0.5, sample std sqrt(0.5)
    adv = group_advantages(torch.tensor([0.0, 1.0, 3.0, 3.0]), 2, "group")
    s = math.sqrt(0.5) + 1e-4
    assert adv.tolist() == pytest.approx([-0.5 / s, 0.5 / s, 0.0, 0.0], rel=1e-6)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="multiple of num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "sometimes")


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_matches_reference(loss_type, seed):
    lp, old, ref, adv, mask = random_batch(seed)
    eps_lo, eps_hi, beta, max_len = 0.2, 0.28, 0.04, 9
    loss, _ = policy_loss(
        lp, old, adv, mask, loss_type=loss_type, epsilon=eps_lo, epsilon_high=eps_hi, beta=beta,
        ref_logprobs=ref, max_completion_length=max_len,
    )
    want = ref_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), loss_type,
                    eps_lo, eps_hi, beta, max_len)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_sharded_loss_sums_to_whole_batch_loss(loss_type):
    """Two workers holding halves of the batch, given the global counts, add up to the whole-batch loss."""
    lp, old, ref, adv, mask = random_batch(7, b=8)
    kw = dict(loss_type=loss_type, beta=0.1, max_completion_length=7)
    whole, _ = policy_loss(lp, old, adv, mask, ref_logprobs=ref, **kw)
    globals_ = dict(num_sequences_global=8, num_tokens_global=int(mask.sum()))
    parts = [
        policy_loss(lp[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], **kw, **globals_)[0]
        for s in (slice(0, 3), slice(3, 8))  # unequal shards on purpose
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-12)
    # dapo with global counts is exactly the reference with the global token count
    if loss_type == "dapo":
        n_tok = int(mask.sum())
        want = ref_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), "dapo",
                        0.2, 0.2, 0.1, 7, n_tok=n_tok)
        assert whole.item() == pytest.approx(want, rel=1e-10)


def test_per_token_advantages_and_no_kl():
    lp, old, ref, adv, mask = random_batch(3)
    per_token_adv = adv.unsqueeze(-1).expand_as(lp)
    a, _ = policy_loss(lp, old, adv, mask, beta=0.0)
    b, m = policy_loss(lp, old, per_token_adv, mask, beta=0.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert "kl" not in m


def test_on_policy_loss_is_minus_mean_advantage_with_gradient():
    """old_logprobs=None: ratio 1, so grpo loss = -mean(A) and d loss / d logp = -A / (len * B)."""
    lp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, _ = policy_loss(lp, None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    want = [[-1 / 4, -1 / 4, 0.0], [2 / 6, 2 / 6, 2 / 6]]
    assert lp.grad.tolist() == [pytest.approx(r) for r in want]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gradcheck(loss_type):
    lp, old, ref, adv, mask = random_batch(11, b=3, t=4)
    lp = lp.clone().requires_grad_(True)

    def f(x):
        return policy_loss(x, old, adv, mask, loss_type=loss_type, epsilon_high=0.3, beta=0.04,
                           ref_logprobs=ref, num_tokens_global=20)[0]

    assert torch.autograd.gradcheck(f, (lp,), eps=1e-6, atol=1e-8)


def test_clip_ratio_metrics_on_constructed_tokens():
    # ratios: exp(log 0.5)=0.5, 1.0, 1.5, 0.5, 1.5, 1.25 ; eps_low 0.2, eps_high 0.28
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.5, 1.25]], dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = ratios.log()
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    _, m = policy_loss(lp, old, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.0)
    # row 0 (A<0): 0.5 < 0.8 is low-clipped; 1.5 is not counted (high clipping needs A>0)
    # row 1 (A>0): 1.5 > 1.28 high-clipped; 1.25 inside; 0.5 not counted (low needs A<0)
    assert m["clip_ratio/low_mean"] == pytest.approx(1 / 6)
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 6)
    assert m["clip_ratio/region_mean"] == pytest.approx(2 / 6)
    # masking the clipped tokens out removes them from the metrics
    mask[0, 0] = False
    _, m = policy_loss(lp, old, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.0)
    assert m["clip_ratio/low_mean"] == 0.0 and m["clip_ratio/high_mean"] == pytest.approx(1 / 5)


def test_kl_and_entropy_metrics():
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.float64)
    ent = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    mask = torch.tensor([[True, False]])
    _, m = policy_loss(lp, lp, torch.tensor([1.0]), mask, beta=0.5, ref_logprobs=ref, entropies=ent)
    d = -0.5
    assert m["kl"] == pytest.approx(math.exp(d) - d - 1)
    assert m["entropy/mean"] == pytest.approx(0.3)
    assert m["num_tokens"] == 1.0


def test_policy_loss_bad_input():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, torch.zeros(2), m, beta=0.04)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(x, x, torch.zeros(2), m, beta=0.0, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(x, x, torch.zeros(2), m, beta=0.0, loss_type="ppo")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy_loss(x, x, torch.zeros(2), m[:, :2], beta=0.0)


# ---------------------------------------------------------------- DAPO filters


def test_dynamic_sample_filter():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.3, 0.3, 0.3])
    keep = dynamic_sample_filter(rewards, 3)
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3
    assert keep.dtype == torch.bool


def test_overlong_mask():
    truncated = torch.tensor([False, True, False])
    assert overlong_mask(truncated).tolist() == [True, False, True]
    tokens = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert overlong_mask(truncated, tokens).tolist() == [[True, True, False], [False] * 3, [True, False, False]]
    # truncated rows then weigh nothing in the loss
    lp = torch.randn(3, 3, dtype=torch.float64)
    old = lp + 0.1
    adv = torch.tensor([1.0, 5.0, -1.0], dtype=torch.float64)
    full, _ = policy_loss(lp, old, adv, overlong_mask(truncated, tokens), beta=0.0, loss_type="bnpo")
    keep = torch.tensor([0, 2])
    part, _ = policy_loss(lp[keep], old[keep], adv[keep], tokens[keep].bool(), beta=0.0, loss_type="bnpo")
    assert full.item() == pytest.approx(part.item(), rel=1e-12)
