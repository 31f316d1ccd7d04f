"""The generalised JSD of GKD against a plain-Python float64 re-statement, its endpoints, the chunked
backward (gradcheck), the token reduction, and the on-policy data-source draw.

The reference follows Agarwal et al. 2024, eq. 1, with TRL's conventions: mixture
M = (1 - beta) S + beta T, JSD = beta KL(T||M) + (1 - beta) KL(S||M); beta = 0 is KL(T||S) and
beta = 1 is KL(S||T); softmax at a temperature; batchmean over the selected positions.
"""

import math
import random

import pytest
import torch

from swiftray.algorithms.gkd_math import generalized_jsd, generalized_jsd_loss, gkd_data_source

torch.set_num_threads(1)


def softmax(xs: list[float], temperature: float) -> list[float]:
    top = max(xs)
    exps = [math.exp((x - top) / temperature) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_jsd(student: list[float], teacher: list[float], beta: float, temperature: float) -> float:
    s, t = softmax(student, temperature), softmax(teacher, temperature)
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = [(1 - beta) * si + beta * ti for si, ti in zip(s, t)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def rand_logits(rng: random.Random, *shape: int) -> list:
    if len(shape) == 1:
        return [rng.gauss(0, 2) for _ in range(shape[0])]
    return [rand_logits(rng, *shape[1:]) for _ in range(shape[0])]


def t64(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


BETAS = [0.0, 1.0, 0.5, 0.1, 0.9]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", BETAS)
def test_per_position_jsd_matches_reference(seed, beta):
    rng = random.Random(seed)
    n, vocab = rng.randint(1, 6), rng.randint(2, 11)
    temperature = rng.choice([1.0, rng.uniform(0.3, 2.0)])
    student, teacher = rand_logits(rng, n, vocab), rand_logits(rng, n, vocab)
    got = generalized_jsd(t64(student), t64(teacher), beta, temperature)
    want = [ref_jsd(s, t, beta, temperature) for s, t in zip(student, teacher)]
    assert torch.allclose(got, t64(want), atol=1e-12)


def test_endpoints_are_forward_and_reverse_kl_and_interior_is_bounded():
    rng = random.Random(0)
    student, teacher = rand_logits(rng, 4, 9), rand_logits(rng, 4, 9)
    s, t = t64(student), t64(teacher)
    forward = [kl(softmax(b, 1.0), softmax(a, 1.0)) for a, b in zip(student, teacher)]  # KL(T || S)
    reverse = [kl(softmax(a, 1.0), softmax(b, 1.0)) for a, b in zip(student, teacher)]  # KL(S || T)
    assert torch.allclose(generalized_jsd(s, t, 0.0), t64(forward), atol=1e-12)
    assert torch.allclose(generalized_jsd(s, t, 1.0), t64(reverse), atol=1e-12)
    # The interior formula swaps roles with beta -> 1 - beta, vanishes toward both ends, and a JSD is
    # at most the entropy-like bound log 2 at beta = 1/2.
    assert torch.allclose(generalized_jsd(s, t, 0.3), generalized_jsd(t, s, 0.7), atol=1e-12)
    assert float(generalized_jsd(s, t, 1e-9).max()) < 1e-6
    assert float(generalized_jsd(s, t, 0.5).max()) <= math.log(2)
    assert float(generalized_jsd(s, s, 0.5).abs().max()) < 1e-12


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.4])
def test_masked_batchmean_any_chunk_size(seed, beta):
    rng = random.Random(seed)
    batch, width, vocab = rng.randint(1, 4), rng.randint(1, 6), rng.randint(2, 9)
    temperature = rng.uniform(0.5, 1.5)
    student, teacher = rand_logits(rng, batch, width, vocab), rand_logits(rng, batch, width, vocab)
    keep = [[rng.random() < 0.6 for _ in range(width)] for _ in range(batch)]
    keep[0][0] = True
    picked = [(student[b][t], teacher[b][t]) for b in range(batch) for t in range(width) if keep[b][t]]
    want = sum(ref_jsd(s, t, beta, temperature) for s, t in picked) / len(picked)
    for chunk in (1, 3, 1024):
        loss, metrics = generalized_jsd_loss(
            t64(student),
            t64(teacher),
            torch.tensor(keep),
            beta=beta,
            temperature=temperature,
            chunk_size=chunk,
        )
        assert float(loss) == pytest.approx(want, abs=1e-12)
        assert metrics["num_tokens"] == len(picked) and metrics["jsd"] == pytest.approx(want, abs=1e-12)
    # The same positions given as [N, V] rows with no mask.
    rows_s, rows_t = t64([p[0] for p in picked]), t64([p[1] for p in picked])
    flat, _ = generalized_jsd_loss(rows_s, rows_t, beta=beta, temperature=temperature, chunk_size=2)
    assert float(flat) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_backward_passes_gradcheck(beta):
    gen = torch.Generator().manual_seed(int(beta * 10))
    student = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)

    def loss(s, t):
        return generalized_jsd_loss(s, t, beta=beta, temperature=0.8, chunk_size=3)[0]

    assert torch.autograd.gradcheck(loss, (student, teacher))
    # And the chunked gradient equals plain autograd through the unchunked formula.
    s = student.detach().requires_grad_(True)
    generalized_jsd(s, teacher.detach(), beta, 0.8).mean().backward()
    chunked = student.detach().requires_grad_(True)
    loss(chunked, teacher.detach()).backward()
    assert torch.allclose(chunked.grad, s.grad, atol=1e-12)


def test_token_shares_sum_to_the_whole_loss_and_bf16_runs_in_float32():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(10, 6, dtype=torch.float64, generator=gen)
    teacher = torch.randn(10, 6, dtype=torch.float64, generator=gen)
    whole, _ = generalized_jsd_loss(student, teacher, beta=0.5)
    shares = sum(
        generalized_jsd_loss(student[rows], teacher[rows], beta=0.5, num_tokens_global=10)[0]
        for rows in (slice(0, 4), slice(4, 5), slice(5, 10))
    )
    assert float(shares) == pytest.approx(float(whole), abs=1e-12)

    half_s = student.to(torch.bfloat16).requires_grad_(True)
    loss, _ = generalized_jsd_loss(half_s, teacher.to(torch.bfloat16), beta=0.5, chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and half_s.grad.dtype == torch.bfloat16
    assert float(loss.detach()) == pytest.approx(float(whole), rel=0.05)


def test_vocabularies_of_different_sizes_are_aligned_with_the_other_models_logits():
    rng = random.Random(1)
    student, teacher = rand_logits(rng, 3, 5), rand_logits(rng, 3, 8)
    loss, _ = generalized_jsd_loss(t64(student), t64(teacher), beta=0.5)
    padded = [s + t[5:] for s, t in zip(student, teacher)]
    want = sum(ref_jsd(s, t, 0.5, 1.0) for s, t in zip(padded, teacher)) / 3
    assert float(loss) == pytest.approx(want, abs=1e-12)


def test_empty_selection_is_zero_and_bad_arguments_are_named():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    loss, metrics = generalized_jsd_loss(logits, logits.detach(), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics["num_tokens"] == 0
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        generalized_jsd_loss(logits, logits, beta=1.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        generalized_jsd(logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match="mask must be"):
        generalized_jsd_loss(logits, logits, torch.ones(3, 2, dtype=torch.bool))


def test_data_source_draw_is_seeded_and_has_rate_lmbda():
    steps = range(4000)
    assert {gkd_data_source(s, lmbda=0.0) for s in steps} == {"dataset"}
    assert {gkd_data_source(s, lmbda=1.0) for s in steps} == {"student"}
    assert {gkd_data_source(s, lmbda=0.0, seq_kd=True) for s in steps} == {"teacher"}
    draws = [gkd_data_source(s, lmbda=0.3, seed=7) for s in steps]
    assert draws == [gkd_data_source(s, lmbda=0.3, seed=7) for s in steps]  # same on every process / resume
    assert draws != [gkd_data_source(s, lmbda=0.3, seed=8) for s in steps]
    rate = draws.count("student") / len(draws)
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(draws))
    with pytest.raises(ValueError, match="lmbda must be in"):
        gkd_data_source(0, lmbda=2.0)


def test_chunked_loss_saves_only_its_inputs_for_backward():
    """The point of chunking: autograd keeps the two [N, V] inputs, not per-chunk softmax buffers."""
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(64, 50, generator=gen, requires_grad=True)
    teacher = torch.randn(64, 50, generator=gen)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        generalized_jsd_loss(student, teacher, beta=0.5, chunk_size=8)
    assert sum(saved) <= 2 * student.numel()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        generalized_jsd(student, teacher, 0.5).mean()
    assert sum(saved) > 4 * student.numel()  # the plain formula keeps several [N, V] buffers


@pytest.mark.parametrize("beta", BETAS)
def test_agrees_with_trls_generalized_jsd_loss_where_installed(beta, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(3, 6, 11, dtype=torch.float64, generator=gen)
    teacher = torch.randn(3, 6, 11, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[torch.rand(3, 6, generator=gen) < 0.4] = -100
    want = gkd_trainer.GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=0.7
    )
    got, _ = generalized_jsd_loss(student, teacher, labels != -100, beta=beta, temperature=0.7, chunk_size=4)
    assert float(got) == pytest.approx(float(want), abs=1e-12)
