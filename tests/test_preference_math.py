"""Preference losses against plain-Python float64 re-statements of their papers' formulas.

The references below are written from the papers, pair by pair with `math`, independently of
preference_math: DPO (Rafailov et al. 2023, eq. 7), cDPO label smoothing, robust DPO (Chowdhury et al.
2024, eq. 9), SLiC hinge, IPO (Azar et al. 2023, eq. 17, on per-token averages), BCO (Jung et al. 2024),
EXO (Ji et al. 2024), NCA (Chen et al. 2024), SPPO hard, APO (D'Oosterlinck et al. 2024), AOT, DiscoPOP,
RPO (Pang et al. 2024), KTO (Ethayarajh et al. 2024, eq. 7), ORPO (Hong et al. 2024, eqs. 4-7),
CPO (Xu et al. 2024, eq. 3), SimPO (Meng et al. 2024, eq. 6), and the Bradley-Terry reward-model loss.
"""

import math
import random

import pytest
import torch

from swiftray.algorithms.preference_math import (
    DPO_LOSS_TYPES,
    RunningMoments,
    cpo_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    kto_mismatched_order,
    kto_summarize_metrics,
    orpo_loss,
    reward_model_loss,
    sequence_logps,
    simpo_loss,
    split_pairs,
)

torch.set_num_threads(1)
TOL = dict(rel=1e-10, abs=1e-12)


# ---------------------------------------------------------------- references (plain Python, float64)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def log_sig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_dpo_pair(kind: str, pc, pr, rc, rr, lc, lr, beta, eps, tau=0.05, delta=0.0) -> float:
    """One pair's loss; pc/pr policy sums, rc/rr reference sums, lc/lr completion lengths."""
    h = (pc - rc) - (pr - rr)  # the implicit reward margin, over beta
    if kind == "sigmoid":
        return -(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)
    if kind == "robust":
        return (-(1 - eps) * log_sig(beta * h) + eps * log_sig(-beta * h)) / (1 - 2 * eps)
    if kind == "hinge":
        return max(0.0, 1 - beta * h)
    if kind == "ipo":
        avg = (pc - rc) / lc - (pr - rr) / lr
        return (avg - 1 / (2 * beta)) ** 2
    if kind == "sigmoid_norm":
        return -log_sig(beta * ((pc - rc) / lc - (pr - rr) / lr))
    if kind == "bco_pair":
        return -log_sig(beta * (pc - rc) - delta) - log_sig(-(beta * (pr - rr) - delta))
    if kind == "exo_pair":
        e = eps or 1e-3
        q_w, q_l = sig(beta * h), sig(-beta * h)  # the model's preference distribution over {w, l}
        return q_w * (math.log(q_w) - math.log(1 - e)) + q_l * (math.log(q_l) - math.log(e))
    if kind == "nca_pair":
        c, r = beta * (pc - rc), beta * (pr - rr)
        return -log_sig(c) - 0.5 * log_sig(-c) - 0.5 * log_sig(-r)
    if kind == "sppo_hard":
        return ((pc - rc) - 1 / (2 * beta)) ** 2 + ((pr - rr) + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return (1 - sig(beta * (pc - rc))) + sig(beta * (pr - rr))
    if kind == "apo_down":
        return sig(beta * (pc - rc)) + (1 - sig(beta * h))
    if kind == "discopop":
        x = beta * h
        mix = sig(x / tau)
        return -log_sig(x) * (1 - mix) + math.exp(-x) * mix
    raise KeyError(kind)


def ref_aot(kind, pc, pr, rc, rr, beta, eps) -> list[float]:
    """AOT: the i-th smallest policy quantity against the i-th smallest reference one."""
    if kind == "aot":
        a = sorted(c - r for c, r in zip(pc, pr))
        b = sorted(c - r for c, r in zip(rc, rr))
    else:
        a = sorted(c - r for c, r in zip(pc, rc))
        b = sorted(c - r for c, r in zip(pr, rr))
    return [-(1 - eps) * log_sig(beta * (x - y)) - eps * log_sig(-beta * (x - y)) for x, y in zip(a, b)]


def ref_nll(pc, lc) -> float:
    return -sum(pc) / sum(lc)


def ref_dpo(kinds, weights, pc, pr, rc, rr, lc, lr, beta, eps, rpo_alpha=None, delta=0.0) -> float:
    total = 0.0
    for kind, w in zip(kinds, weights):
        if kind == "sft":
            total += w * ref_nll(pc, lc)
        elif kind in ("aot", "aot_unpaired"):
            losses = ref_aot(kind, pc, pr, rc, rr, beta, eps)
            total += w * sum(losses) / len(losses)
        else:
            losses = [ref_dpo_pair(kind, *v, beta, eps, delta=delta) for v in zip(pc, pr, rc, rr, lc, lr)]
            total += w * sum(losses) / len(losses)
    if rpo_alpha is not None:
        total += rpo_alpha * ref_nll(pc, lc)
    return total


def make_pairs(n: int, seed: int):
    """Completion log-prob sums, negative, with lengths such that every per-token average is below 0."""
    rng = random.Random(seed)
    lc = [rng.randint(1, 20) for _ in range(n)]
    lr = [rng.randint(1, 20) for _ in range(n)]
    pc = [-rng.uniform(0.05, 3.0) * n_ for n_ in lc]
    pr = [-rng.uniform(0.05, 3.0) * n_ for n_ in lr]
    rc = [-rng.uniform(0.05, 3.0) * n_ for n_ in lc]
    rr = [-rng.uniform(0.05, 3.0) * n_ for n_ in lr]
    return pc, pr, rc, rr, lc, lr


def t(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ---------------------------------------------------------------- DPO


@pytest.mark.parametrize("kind", [k for k in DPO_LOSS_TYPES if k != "sft"])
@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_each_loss_type_matches_its_formula(kind, beta, eps):
    pc, pr, rc, rr, lc, lr = make_pairs(13, seed=DPO_LOSS_TYPES.index(kind) + int(10 * beta))
    delta = 0.37 if kind == "bco_pair" else 0.0
    loss, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, loss_type=kind, label_smoothing=eps,
                       chosen_lengths=t(lc), rejected_lengths=t(lr), bco_delta=delta)
    assert loss.item() == pytest.approx(ref_dpo([kind], [1.0], pc, pr, rc, rr, lc, lr, beta, eps, delta=delta), **TOL)


def test_dpo_label_smoothing_changes_sigmoid_and_robust_is_unbiased_under_flips():
    pc, pr, rc, rr, lc, lr = make_pairs(9, seed=3)
    plain, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type="sigmoid")
    smooth, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type="sigmoid", label_smoothing=0.1)
    assert abs(plain.item() - smooth.item()) > 1e-3
    # Robust DPO: the expected loss over a label flip with probability eps is the clean DPO loss.
    eps = 0.2
    robust, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type="robust", label_smoothing=eps)
    flipped, _ = dpo_loss(t(pr), t(pc), t(rr), t(rc), loss_type="robust", label_smoothing=eps)
    assert ((1 - eps) * robust + eps * flipped).item() == pytest.approx(plain.item(), **TOL)


def test_dpo_ipo_uses_per_token_averages():
    pc, pr, rc, rr, lc, lr = make_pairs(7, seed=4)
    loss, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type="ipo", beta=0.3, chosen_lengths=t(lc),
                       rejected_lengths=t(lr))
    doubled, _ = dpo_loss(2 * t(pc), 2 * t(pr), 2 * t(rc), 2 * t(rr), loss_type="ipo", beta=0.3,
                          chosen_lengths=2 * t(lc), rejected_lengths=2 * t(lr))
    assert loss.item() == pytest.approx(doubled.item(), **TOL)  # twice as long, same per-token scores
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type="ipo")


def test_dpo_rpo_and_weighted_mix():
    pc, pr, rc, rr, lc, lr = make_pairs(11, seed=5)
    kinds, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, 0.5]
    loss, metrics = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.2, loss_type=kinds, loss_weights=weights,
                             rpo_alpha=0.7, chosen_lengths=t(lc), rejected_lengths=t(lr), bco_delta=0.1)
    expect = ref_dpo(kinds, weights, pc, pr, rc, rr, lc, lr, 0.2, 0.0, rpo_alpha=0.7, delta=0.1)
    assert loss.item() == pytest.approx(expect, **TOL)
    assert metrics["nll_loss"] == pytest.approx(ref_nll(pc, lc), **TOL)
    rpo_only, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), rpo_alpha=1.0, chosen_lengths=t(lc))
    assert rpo_only.item() == pytest.approx(ref_dpo(["sigmoid"], [1], pc, pr, rc, rr, lc, lr, 0.1, 0.0, 1.0), **TOL)
    with pytest.raises(ValueError, match="one weight per loss_type"):
        dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type="kto_pair")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(t(pc), t(pr), t(rc), t(rr), rpo_alpha=1.0)


def test_dpo_metrics_use_trl_names_and_values():
    pc, pr, rc, rr, lc, lr = make_pairs(10, seed=6)
    beta = 0.25
    _, m = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, loss_type=["sigmoid", "hinge"], loss_weights=[2, 3])
    chosen = [beta * (a - b) for a, b in zip(pc, rc)]
    rejected = [beta * (a - b) for a, b in zip(pr, rr)]
    n = len(pc)
    assert m["rewards/chosen"] == pytest.approx(sum(chosen) / n, **TOL)
    assert m["rewards/rejected"] == pytest.approx(sum(rejected) / n, **TOL)
    assert m["rewards/margins"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / n, **TOL)
    assert m["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / n)
    assert m["logps/chosen"] == pytest.approx(sum(pc) / n, **TOL)
    assert m["logps/rejected"] == pytest.approx(sum(pr) / n, **TOL)
    assert "nll_loss" not in m


def test_dpo_reference_free_and_missing_reference():
    pc, pr, _, _, _, _ = make_pairs(5, seed=7)
    loss, _ = dpo_loss(t(pc), t(pr), None, None, reference_free=True)
    zero = [0.0] * 5
    assert loss.item() == pytest.approx(ref_dpo(["sigmoid"], [1], pc, pr, zero, zero, zero, zero, 0.1, 0.0), **TOL)
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(t(pc), t(pr), None, None)


def test_dpo_sigmoid_gradient_is_the_closed_form():
    pc, pr, rc, rr, _, _ = make_pairs(8, seed=8)
    beta, eps = 0.3, 0.1
    c, r = t(pc).requires_grad_(), t(pr).requires_grad_()
    loss, _ = dpo_loss(c, r, t(rc), t(rr), beta=beta, label_smoothing=eps)
    loss.backward()
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        # d/dh of -(1-eps) log σ(βh) - eps log σ(-βh), over the mean's n
        dh = (-(1 - eps) * beta * sig(-beta * h) + eps * beta * sig(beta * h)) / len(pc)
        assert c.grad[i].item() == pytest.approx(dh, **TOL)
        assert r.grad[i].item() == pytest.approx(-dh, **TOL)


@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
def test_dpo_gradcheck(kind):
    pc, pr, rc, rr, lc, lr = make_pairs(6, seed=9)
    c, r = t(pc).requires_grad_(), t(pr).requires_grad_()

    def f(c, r):
        return dpo_loss(c, r, t(rc), t(rr), beta=0.2, loss_type=kind, label_smoothing=0.1, rpo_alpha=0.5,
                        chosen_lengths=t(lc), rejected_lengths=t(lr))[0]

    assert torch.autograd.gradcheck(f, (c, r))


def test_global_counts_make_ranks_and_micro_batches_sum_to_one_process():
    pc, pr, rc, rr, lc, lr = make_pairs(16, seed=10)
    kw = dict(beta=0.2, loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1, 0.5, 0.3], rpo_alpha=0.4)
    whole_c = t(pc).requires_grad_()
    whole, _ = dpo_loss(whole_c, t(pr), t(rc), t(rr), chosen_lengths=t(lc), rejected_lengths=t(lr), **kw)
    whole.backward()
    parts_c = t(pc).requires_grad_()
    total = 0.0
    for start in range(0, 16, 4):  # 2 ranks x 2 micro-batches of 4 pairs
        s = slice(start, start + 4)
        part, _ = dpo_loss(parts_c[s], t(pr)[s], t(rc)[s], t(rr)[s], chosen_lengths=t(lc)[s],
                           rejected_lengths=t(lr)[s], num_pairs_global=16, num_chosen_tokens_global=sum(lc), **kw)
        part.backward()
        total += part.item()
    assert total == pytest.approx(whole.item(), **TOL)
    assert torch.allclose(parts_c.grad, whole_c.grad, rtol=1e-10, atol=1e-13)


def test_row_helpers():
    tokens = t([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -1.0, -1.0], [0.0, -4.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])
    sums, lengths = sequence_logps(tokens, mask)
    assert sums.tolist() == [-3.0, -0.5, -5.0, -4.0] and lengths.tolist() == [2, 1, 3, 1]
    chosen, rejected = split_pairs(sums)
    assert chosen.tolist() == [-3.0, -5.0] and rejected.tolist() == [-0.5, -4.0]
    with pytest.raises(ValueError, match="pairs"):
        split_pairs(sums[:3])


def test_running_moments_track_the_stream():
    rng = random.Random(11)
    batches = [[rng.gauss(2.0, 3.0) for _ in range(rng.randint(2, 9))] for _ in range(6)]
    moments = RunningMoments()
    for batch in batches:
        mean = moments.update(t(batch))
    seen = [x for b in batches for x in b]
    true_mean = sum(seen) / len(seen)
    assert mean == pytest.approx(true_mean, rel=1e-9)
    std = math.sqrt(sum((x - true_mean) ** 2 for x in seen) / (len(seen) - 1))
    assert moments.std == pytest.approx(std, rel=1e-9)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored == moments


# ---------------------------------------------------------------- KTO


def ref_kto(logps, refs, labels, kl_pol, kl_ref, beta, wd, wu) -> tuple[float, float]:
    z0 = max(0.0, sum(a - b for a, b in zip(kl_pol, kl_ref)) / len(kl_pol))
    losses = []
    for lp, rp, good in zip(logps, refs, labels):
        r = lp - rp
        losses.append(wd * (1 - sig(beta * (r - z0))) if good else wu * (1 - sig(beta * (z0 - r))))
    return sum(losses) / len(losses), z0


@pytest.mark.parametrize("kl_shift", [0.0, 20.0])  # a shift of 0 makes the raw mean negative: clamped at 0
def test_kto_matches_its_formula(kl_shift):
    rng = random.Random(12)
    n = 12
    logps = [-rng.uniform(1, 30) for _ in range(n)]
    refs = [-rng.uniform(1, 30) for _ in range(n)]
    labels = [rng.random() < 0.4 for _ in range(n)]
    kl_pol = [-rng.uniform(20, 30) + kl_shift for _ in range(n)]
    kl_ref = [-rng.uniform(10, 20) for _ in range(n)]
    kl = kto_kl_estimate(t(kl_pol), t(kl_ref))
    expect, z0 = ref_kto(logps, refs, labels, kl_pol, kl_ref, 0.3, 1.5, 0.7)
    assert kl.item() == pytest.approx(z0, **TOL)
    assert (z0 == 0.0) == (kl_shift == 0.0)
    lp = t(logps).requires_grad_()
    loss, m = kto_loss(lp, t(refs), torch.tensor(labels), kl, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    assert loss.item() == pytest.approx(expect, **TOL)
    assert torch.autograd.gradcheck(
        lambda x: kto_loss(x, t(refs), torch.tensor(labels), kl, beta=0.3, desirable_weight=1.5,
                           undesirable_weight=0.7)[0], (lp,))
    good = [i for i in range(n) if labels[i]]
    bad = [i for i in range(n) if not labels[i]]
    summary = kto_summarize_metrics(m)
    assert summary["rewards/chosen"] == pytest.approx(sum(0.3 * (logps[i] - refs[i]) for i in good) / len(good), **TOL)
    assert summary["logps/rejected"] == pytest.approx(sum(logps[i] for i in bad) / len(bad), **TOL)
    assert summary["rewards/margins"] == pytest.approx(summary["rewards/chosen"] - summary["rewards/rejected"], **TOL)
    assert summary["kl"] == pytest.approx(z0, **TOL)


def test_kto_reference_point_carries_no_gradient_and_metrics_keys_are_stable():
    kl_pol = t([-3.0, -1.0]).requires_grad_()
    kl = kto_kl_estimate(kl_pol, t([-5.0, -4.0]))
    assert not kl.requires_grad
    _, all_good = kto_loss(t([-1.0, -2.0]), t([-1.5, -1.0]), torch.tensor([True, True]), kl)
    _, all_bad = kto_loss(t([-1.0, -2.0]), t([-1.5, -1.0]), torch.tensor([False, False]), kl)
    assert set(all_good) == set(all_bad)  # workers all-reduce metrics by key
    assert "rewards/rejected" not in kto_summarize_metrics(all_good)


def test_kto_mismatched_order_rotates_by_one():
    assert kto_mismatched_order(4) == [3, 0, 1, 2]
    assert kto_mismatched_order(1) == [0] and kto_mismatched_order(0) == []


def test_kto_apo_zero_unpaired_ignores_the_reference_point():
    logps, refs, labels = t([-3.0, -2.0, -7.0]), t([-4.0, -1.0, -6.0]), torch.tensor([True, False, True])
    a, _ = kto_loss(logps, refs, labels, 0.0, loss_type="apo_zero_unpaired", beta=0.5)
    b, _ = kto_loss(logps, refs, labels, 3.0, loss_type="apo_zero_unpaired", beta=0.5)
    r = [-3.0 + 4.0, -2.0 + 1.0, -7.0 + 6.0]
    expect = ((1 - sig(0.5 * r[0])) + sig(0.5 * r[1]) + (1 - sig(0.5 * r[2]))) / 3
    assert a.item() == pytest.approx(expect, **TOL) and b.item() == pytest.approx(expect, **TOL)


# ---------------------------------------------------------------- ORPO, CPO, SimPO


def ref_orpo(pc, pr, lc, lr, beta) -> float:
    terms = []
    for a, b, na, nb in zip(pc, pr, lc, lr):
        p_w, p_l = math.exp(a / na), math.exp(b / nb)  # per-token averaged likelihoods
        odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
        terms.append(log_sig(math.log(odds_w / odds_l)))
    return ref_nll(pc, lc) - beta * sum(terms) / len(terms)


def test_orpo_matches_its_formula():
    pc, pr, _, _, lc, lr = make_pairs(10, seed=13)
    c = t(pc).requires_grad_()
    loss, m = orpo_loss(c, t(pr), t(lc), t(lr), beta=0.25)
    assert loss.item() == pytest.approx(ref_orpo(pc, pr, lc, lr, 0.25), **TOL)
    assert m["nll_loss"] == pytest.approx(ref_nll(pc, lc), **TOL)
    assert m["logps/chosen"] == pytest.approx(sum(a / n for a, n in zip(pc, lc)) / len(pc), **TOL)
    assert torch.autograd.gradcheck(lambda x: orpo_loss(x, t(pr), t(lc), t(lr), beta=0.25)[0], (c,))


def ref_cpo(kind, pc, pr, lc, lr, beta, eps, gamma, alpha) -> float:
    losses = []
    for a, b, na, nb in zip(pc, pr, lc, lr):
        if kind in ("ipo", "simpo"):
            a, b = a / na, b / nb
        if kind == "simpo":  # SimPO eq. 6: -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ)
            x = beta * (a - b) - gamma
            losses.append(-(1 - eps) * log_sig(x) - eps * log_sig(-x))
        elif kind == "sigmoid":  # CPO eq. 3
            losses.append(-(1 - eps) * log_sig(beta * (a - b)) - eps * log_sig(-beta * (a - b)))
        elif kind == "hinge":
            losses.append(max(0.0, 1 - beta * (a - b)))
        else:
            losses.append((a - b - 1 / (2 * beta)) ** 2)
    return sum(losses) / len(losses) + alpha * ref_nll(pc, lc)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_matches_its_formula(kind):
    pc, pr, _, _, lc, lr = make_pairs(9, seed=14)
    c = t(pc).requires_grad_()
    loss, m = cpo_loss(c, t(pr), t(lc), t(lr), beta=0.4, loss_type=kind, label_smoothing=0.1, simpo_gamma=0.8,
                       cpo_alpha=0.6)
    assert loss.item() == pytest.approx(ref_cpo(kind, pc, pr, lc, lr, 0.4, 0.1, 0.8, 0.6), **TOL)
    assert "rewards/accuracies" in m and m["nll_loss"] == pytest.approx(ref_nll(pc, lc), **TOL)
    assert torch.autograd.gradcheck(
        lambda x: cpo_loss(x, t(pr), t(lc), t(lr), beta=0.4, loss_type=kind, cpo_alpha=0.6)[0], (c,))


def test_simpo_is_reference_free_length_normalised_with_margin():
    pc, pr, _, _, lc, lr = make_pairs(9, seed=15)
    loss, m = simpo_loss(t(pc), t(pr), t(lc), t(lr), beta=2.0, simpo_gamma=1.0)
    assert loss.item() == pytest.approx(ref_cpo("simpo", pc, pr, lc, lr, 2.0, 0.0, 1.0, 0.0), **TOL)
    assert m["rewards/chosen"] == pytest.approx(2.0 * sum(a / n for a, n in zip(pc, lc)) / len(pc), **TOL)
    with_nll, _ = simpo_loss(t(pc), t(pr), t(lc), t(lr), cpo_alpha=1.0)
    assert with_nll.item() == pytest.approx(loss.item() + ref_nll(pc, lc), **TOL)


# ---------------------------------------------------------------- reward model


@pytest.mark.parametrize("with_margin, coef", [(False, None), (True, 0.01), (False, 0.5)])
def test_reward_model_loss_matches_bradley_terry(with_margin, coef):
    rng = random.Random(16)
    n = 10
    rc = [rng.gauss(0, 2) for _ in range(n)]
    rr = [rng.gauss(0, 2) for _ in range(n)]
    margin = [rng.uniform(0, 1) for _ in range(n)] if with_margin else [0.0] * n
    c = t(rc).unsqueeze(-1).requires_grad_()  # a scalar head's [P, 1] logits
    loss, m = reward_model_loss(c, t(rr), margin=t(margin) if with_margin else None,
                                center_rewards_coefficient=coef)
    expect = sum(-log_sig(a - b - mg) for a, b, mg in zip(rc, rr, margin)) / n
    if coef is not None:
        expect += coef * sum((a + b) ** 2 for a, b in zip(rc, rr)) / n
        assert m["center_rewards_loss"] == pytest.approx(coef * sum((a + b) ** 2 for a, b in zip(rc, rr)) / n, **TOL)
    assert loss.item() == pytest.approx(expect, **TOL)
    assert m["rewards/accuracies"] == pytest.approx(sum(a > b for a, b in zip(rc, rr)) / n)
    assert m["rewards/margins"] == pytest.approx(sum(a - b for a, b in zip(rc, rr)) / n, **TOL)
    loss.backward()
    for i in range(n):  # d/dr_c: -σ(-(r_c - r_r - m)) / n + 2 coef (r_c + r_r) / n
        grad = -sig(-(rc[i] - rr[i] - margin[i])) / n + (2 * (coef or 0) * (rc[i] + rr[i]) / n)
        assert c.grad[i, 0].item() == pytest.approx(grad, **TOL)


def _split_sum(fn, tensors: list[torch.Tensor], global_kw: dict, **kw) -> tuple[float, torch.Tensor]:
    """fn over 4 slices with the global counts, summed; and d(sum)/d(first tensor)."""
    first = tensors[0].clone().requires_grad_()
    total = 0.0
    n = first.shape[0]
    for start in range(0, n, n // 4):
        s = slice(start, start + n // 4)
        part, _ = fn(first[s], *[x[s] for x in tensors[1:]], **global_kw, **kw)
        part.backward()
        total += part.item()
    return total, first.grad


@pytest.mark.parametrize("which", ["kto", "orpo", "cpo", "simpo", "rm"])
def test_other_losses_split_over_workers_sum_to_one_process(which):
    pc, pr, rc, _, lc, lr = make_pairs(16, seed=17)
    labels = torch.tensor([i % 3 == 0 for i in range(16)])
    cases = {
        "kto": (kto_loss, [t(pc), t(rc), labels], dict(num_examples_global=16), dict(kl=0.3, beta=0.2)),
        "orpo": (orpo_loss, [t(pc), t(pr), t(lc), t(lr)], dict(num_pairs_global=16, num_chosen_tokens_global=sum(lc)),
                 dict(beta=0.3)),
        "cpo": (cpo_loss, [t(pc), t(pr), t(lc), t(lr)], dict(num_pairs_global=16, num_chosen_tokens_global=sum(lc)),
                dict(loss_type="sigmoid")),
        "simpo": (simpo_loss, [t(pc), t(pr), t(lc), t(lr)],
                  dict(num_pairs_global=16, num_chosen_tokens_global=sum(lc)), dict(cpo_alpha=1.0)),
        "rm": (reward_model_loss, [t(pc), t(pr)], dict(num_pairs_global=16), dict(center_rewards_coefficient=0.1)),
    }
    fn, tensors, global_kw, kw = cases[which]
    whole_first = tensors[0].clone().requires_grad_()
    whole, _ = fn(whole_first, *tensors[1:], **kw)
    whole.backward()
    total, grad = _split_sum(fn, tensors, global_kw, **kw)
    assert total == pytest.approx(whole.item(), **TOL)
    assert torch.allclose(grad, whole_first.grad, rtol=1e-10, atol=1e-13)
