"""RLOO and REINFORCE++ advantages and the KL-in-reward term against plain-Python float64 re-statements.

References written from the papers' formulas, loop by loop: RLOO (Ahmadian et al. 2024: reward minus
the mean of the *other* completions of the prompt), REINFORCE++-baseline as ms-swift documents it
(reward minus group mean, over the std of those differences), and the token-level REINFORCE++ of
OpenRLHF/verl (discounted returns of KL-penalised token rewards, whitened over the batch).
"""

import math
import random
from pathlib import Path

import pytest
import torch

from swiftray.algorithms import get_algorithm
from swiftray.algorithms.advantages import (
    default_kl_in_reward,
    default_scale_rewards,
    discounted_returns,
    estimator_advantages,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_token_advantages,
    rloo_advantages,
    sequence_kl,
)
from swiftray.rewards import load_external_plugins

torch.set_num_threads(1)
EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "scripts" / "plugins" / "example_plugin.py"


def t64(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def ref_std(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def random_rewards(rng: random.Random, g: int) -> list[float]:
    groups = rng.randint(1, 5)
    # Some binary groups (ties, all-equal groups) and some continuous ones.
    return [float(rng.randint(0, 1)) if rng.random() < 0.4 else rng.gauss(0, 2) for _ in range(groups * g)]


def ref_rloo(rewards: list[float], g: int, scale: str) -> list[float]:
    out = []
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            a = r - sum(others) / len(others) if others else 0.0
            if scale == "group":
                a /= ref_std(group) + 1e-4
            elif scale == "batch":
                a /= ref_std(rewards) + 1e-4
            out.append(a)
    return out


def ref_reinforce_pp(rewards: list[float], g: int, scale: str) -> list[float]:
    centred = []
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        centred += [r - sum(group) / g for r in group]
    if scale == "none":
        return centred
    out = []
    for i, a in enumerate(centred):
        start = i // g * g
        std = ref_std(centred[start : start + g]) if scale == "group" else ref_std(centred)
        out.append(a / (std + 1e-4))
    return out


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_rloo_is_reward_minus_mean_of_the_others(seed, scale):
    rng = random.Random(seed)
    g = rng.randint(1, 6)
    rewards = random_rewards(rng, g)
    got = rloo_advantages(t64(rewards), g, scale)
    assert torch.allclose(got, t64(ref_rloo(rewards, g, scale)), atol=1e-10)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_reinforce_plus_plus_normalises_group_centred_rewards(seed, scale):
    rng = random.Random(seed)
    g = rng.randint(1, 6)
    rewards = random_rewards(rng, g)
    got = reinforce_plus_plus_advantages(t64(rewards), g, scale)
    assert torch.allclose(got, t64(ref_reinforce_pp(rewards, g, scale)), atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_builtin_rloo_agrees_with_the_example_plugin(seed):
    load_external_plugins([EXAMPLE_PLUGIN])
    rng = random.Random(seed)
    g = rng.randint(2, 6)
    rewards = t64(random_rewards(rng, g))
    plugin = get_algorithm("grpo_rloo")(num_generations=g)
    assert torch.allclose(rloo_advantages(rewards, g), plugin.advantages(rewards, None), atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus"])
def test_kl_in_reward_subtracts_beta_times_summed_k1_before_the_estimator(seed, estimator):
    rng = random.Random(seed)
    g = rng.randint(2, 5)
    rewards = random_rewards(rng, g)
    n, width = len(rewards), rng.randint(1, 6)
    lengths = [rng.randint(0, width) for _ in range(n)]
    old = [[rng.gauss(-1, 1) for _ in range(width)] for _ in range(n)]
    ref = [[rng.gauss(-1, 1) for _ in range(width)] for _ in range(n)]
    mask = torch.tensor([[t < length for t in range(width)] for length in lengths])
    beta = rng.uniform(0.01, 0.2)

    kl = sequence_kl(t64(old), t64(ref), mask)
    want_kl = [sum(old[i][t] - ref[i][t] for t in range(lengths[i])) for i in range(n)]
    assert torch.allclose(kl, t64(want_kl), atol=1e-12)

    adv, shifted = estimator_advantages(t64(rewards), g, estimator, kl_values=kl, beta=beta)
    penalised = [r - beta * k for r, k in zip(rewards, want_kl)]
    assert torch.allclose(shifted, t64(penalised), atol=1e-12)
    scale = default_scale_rewards(estimator)
    if estimator == "rloo":
        want = ref_rloo(penalised, g, scale)
    elif estimator == "reinforce_plus_plus":
        want = ref_reinforce_pp(penalised, g, scale)
    else:  # GRPO: group mean and group std
        want = []
        for start in range(0, n, g):
            group = penalised[start : start + g]
            want += [(r - sum(group) / g) / (ref_std(group) + 1e-4) for r in group]
    assert torch.allclose(adv, t64(want), atol=1e-10)


def test_ms_swift_defaults_per_estimator_and_bad_names():
    assert [default_scale_rewards(e) for e in ("grpo", "rloo", "reinforce_plus_plus")] == [
        "group",
        "none",
        "batch",
    ]
    assert [default_kl_in_reward(e) for e in ("grpo", "rloo", "reinforce_plus_plus")] == [False, True, True]
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        estimator_advantages(t64([1.0, 2.0]), 2, "ppo")
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        rloo_advantages(t64([1.0, 2.0]), 2, "gdpo")
    with pytest.raises(ValueError, match="not a multiple of num_generations=3"):
        reinforce_plus_plus_advantages(t64([1.0, 2.0]), 3)


def ref_token_reinforce(scores, old, ref, lengths, width, kl_coef, gamma, g):
    if g is not None:
        scores = [s - sum(scores[i // g * g : i // g * g + g]) / g for i, s in enumerate(scores)]
    returns = []
    for b, n in enumerate(lengths):
        r = [-kl_coef * (old[b][t] - ref[b][t]) for t in range(n)]
        if n:
            r[n - 1] += scores[b]
        row = [sum(gamma ** (k - t) * r[k] for k in range(t, n)) for t in range(n)]
        returns.append(row + [0.0] * (width - n))
    xs = [returns[b][t] for b, n in enumerate(lengths) for t in range(n)]
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) + 1e-8)
    adv = [
        [(returns[b][t] - mean) / std if t < n else 0.0 for t in range(width)] for b, n in enumerate(lengths)
    ]
    return adv, returns


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("baseline", [False, True])
def test_token_level_reinforce_plus_plus(seed, baseline):
    rng = random.Random(seed)
    g = rng.randint(1, 4)
    n, width = g * rng.randint(1, 3), rng.randint(2, 7)
    lengths = [rng.randint(0, width) for _ in range(n)]
    lengths[0] = width
    scores = [rng.gauss(0, 1) for _ in range(n)]
    old = [[rng.gauss(-1, 1) for _ in range(width)] for _ in range(n)]
    ref = [[rng.gauss(-1, 1) for _ in range(width)] for _ in range(n)]
    mask = torch.tensor([[t < length for t in range(width)] for length in lengths])
    kl_coef, gamma = rng.uniform(0.0, 0.3), rng.choice([1.0, rng.uniform(0.8, 1.0)])
    kl = torch.where(mask, t64(old) - t64(ref), torch.zeros((), dtype=torch.float64))
    adv, ret = reinforce_plus_plus_token_advantages(
        t64(scores), mask, kl=kl, kl_coef=kl_coef, gamma=gamma, num_generations=g if baseline else None
    )
    want_adv, want_ret = ref_token_reinforce(
        scores, old, ref, lengths, width, kl_coef, gamma, g if baseline else None
    )
    assert torch.allclose(ret, t64(want_ret), atol=1e-10)
    assert torch.allclose(adv, t64(want_adv), atol=1e-9)


def test_discounted_returns_reset_at_each_row_end():
    rewards = t64([[1.0, 2.0, 4.0], [1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert discounted_returns(rewards, mask, 0.5).tolist() == [
        [1.0 + 0.5 * 2 + 0.25 * 4, 2.0 + 0.5 * 4, 4.0],
        [1.0, 0.0, 0.0],
    ]
