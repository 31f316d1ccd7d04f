"""Rollout correction: a bf16 rollout engine beside an fp32 policy, the mismatch logged every step, and
truncated/masked importance sampling (--rollout_importance_sampling_mode) in the GRPO loss.

The weights and the mismatch metrics are checked against a float64 re-statement of the formulas on
random inputs; the plan against the flags; one short run on each side of the dtype line end to end."""

from __future__ import annotations

import math

import pytest
import torch
from _ray import ray_cluster  # noqa: F401  (session fixture)
from test_plan import rlhf_plan
from test_rl_loop import plugin, run  # noqa: F401  (the plugin fixture holds the `varied` reward)

from swiftray.actors.policy import cast_for_engines
from swiftray.algorithms.grpo_math import policy_loss
from swiftray.algorithms.rollout_correction import MODES, importance_weights, mismatch_metrics
from swiftray.arguments import ArgumentError
from swiftray.placement import Cluster, Node


def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    rollout = old + torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.6
    mask = torch.rand(4, 7, generator=g) > 0.25
    mask[0] = False  # a row with no tokens
    return old, rollout, mask


def reference_weights(old, rollout, mask, mode, threshold):
    """The formulas of rollout_correction.py, one token (or sequence) at a time, in float64."""
    out = torch.zeros_like(old)
    for b in range(old.shape[0]):
        tokens = [t for t in range(old.shape[1]) if mask[b, t]]
        seq = math.exp(sum(float(old[b, t] - rollout[b, t]) for t in tokens))
        for t in tokens:
            raw = math.exp(float(old[b, t] - rollout[b, t])) if mode.startswith("token") else seq
            if mode.endswith("truncate"):
                out[b, t] = min(raw, threshold)
            else:
                out[b, t] = raw if raw <= threshold else 0.0
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threshold", [1.2, 2.0])
def test_importance_weights_equal_the_formula(mode, threshold):
    for seed in range(5):
        old, rollout, mask = random_case(seed)
        weights, metrics = importance_weights(old, rollout, mask, mode, threshold)
        expected = reference_weights(old, rollout, mask, mode, threshold)
        torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
        tokens = int(mask.sum())
        assert metrics["rollout_correction/is_weight_mean"] == pytest.approx(float(expected.sum()) / tokens)
        assert 0 <= metrics["rollout_correction/is_over_threshold"] <= 1


def test_mismatch_metrics_equal_the_kl_estimators():
    old, rollout, mask = random_case(3)
    d = [float(old[b, t] - rollout[b, t]) for b in range(4) for t in range(7) if mask[b, t]]
    metrics = mismatch_metrics(old, rollout, mask)
    assert metrics["rollout_correction/kl"] == pytest.approx(sum(-x for x in d) / len(d))
    assert metrics["rollout_correction/k3_kl"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / len(d))
    assert metrics["rollout_correction/max_abs_logprob_diff"] == pytest.approx(max(abs(x) for x in d))
    same = mismatch_metrics(old, old, mask)
    assert same["rollout_correction/kl"] == 0 and same["rollout_correction/k3_kl"] == 0


def test_weights_scale_the_policy_gradient_term_only():
    old, rollout, mask = random_case(1)
    logprobs = (old + 0.05).requires_grad_(True)
    advantages = torch.tensor([0.5, -1.0, 2.0, -0.3], dtype=torch.float64)
    ref = old - 0.2
    weights, _ = importance_weights(old, rollout, mask, "token_truncate", 2.0)
    loss, _ = policy_loss(logprobs, old, advantages, mask, beta=0.1, ref_logprobs=ref, is_weights=weights)
    # Float64 re-statement: per token -min(r A, clip(r) A) w + beta k3, mean over each row's tokens, then rows.
    total = 0.0
    for b in range(4):
        tokens = [t for t in range(7) if mask[b, t]]
        row = 0.0
        for t in tokens:
            r = math.exp(float(logprobs[b, t].detach() - old[b, t]))
            a = float(advantages[b])
            pg = -min(r * a, min(max(r, 0.8), 1.2) * a) * float(weights[b, t])
            d = float(ref[b, t] - logprobs[b, t].detach())
            row += pg + 0.1 * (math.exp(d) - d - 1)
        total += row / max(1, len(tokens))
    assert float(loss) == pytest.approx(total / 4, rel=1e-9)


def test_plan_casts_for_the_engines_and_asks_them_for_logprobs(tiny_model_dir):
    cpu = Cluster((Node(4, 0),), "test")
    plain = rlhf_plan(tiny_model_dir, cpu, "--reward_funcs", "accuracy", nproc=1)
    assert plain.role("rollout").config.torch_dtype == "float32"
    assert not plain.role("rollout").config.return_logprobs and plain.role("policy").config.engine_dtype is None
    bf16 = rlhf_plan(tiny_model_dir, cpu, "--reward_funcs", "accuracy", "--rollout_dtype", "bfloat16", nproc=1)
    assert bf16.role("rollout").config.torch_dtype == "bfloat16" and bf16.role("rollout").config.return_logprobs
    assert bf16.role("policy").config.torch_dtype == "float32" and bf16.role("policy").config.engine_dtype == "bfloat16"
    corrected = rlhf_plan(tiny_model_dir, cpu, "--reward_funcs", "accuracy", "--rollout_importance_sampling_mode",
                          "sequence_mask", "--rollout_importance_sampling_threshold", "3", nproc=1)
    assert corrected.role("rollout").config.return_logprobs
    with pytest.raises(ArgumentError, match="ppo has no rollout correction"):
        rlhf_plan(tiny_model_dir, cpu, "--rlhf_type", "ppo", "--reward_funcs", "accuracy",
                  "--rollout_importance_sampling_mode", "token_truncate", nproc=1)
    with pytest.raises(ArgumentError, match="--rollout_dtype bfloat16: dpo generates no rollouts"):
        rlhf_plan(tiny_model_dir, cpu, "--rlhf_type", "dpo", "--rollout_dtype", "bfloat16", nproc=1)


def test_the_policy_casts_its_floating_weights_for_a_bf16_engine():
    state = {"w": torch.randn(3, 4, dtype=torch.float64), "steps": torch.tensor([7])}
    cast = cast_for_engines(state, "bfloat16")
    assert cast["w"].dtype == torch.bfloat16 and torch.equal(cast["w"], state["w"].to(torch.bfloat16))
    assert cast["steps"].dtype == torch.int64 and cast["steps"].item() == 7  # integer buffers stay
    assert cast_for_engines(state, None) is state


def test_a_bf16_engine_is_measured_and_corrected_end_to_end(ray_cluster, tiny_model_dir, plugin, tmp_path):  # noqa: F811
    # (An fp32 engine's log-probs equal the policy's after a sync: tests/test_rl_weight_sync.py.)
    _, bf16 = run(tmp_path / "bf16", tiny_model_dir, "--rollout_dtype", "bfloat16",
                  "--rollout_importance_sampling_mode", "token_truncate",
                  "--rollout_importance_sampling_threshold", "1.002", plugin=plugin)
    for line in bf16:  # bf16 weights sample from a slightly different distribution: measured, then capped
        assert 0 < line["train/rollout_correction/k3_kl"] < 1e-3  # (logged to 6 decimals)
        assert 1e-3 < line["train/rollout_correction/max_abs_logprob_diff"] < 0.1
        assert line["train/rollout_correction/is_weight_mean"] <= 1.002 and math.isfinite(line["train/loss"])
        assert line["train/rollout_correction/is_over_threshold"] > 0  # a cap of 1.002 bites somewhere
