"""--rollout_quantization int8: the hf engine decodes with int8 copies of its linear weights.

Checked here: the int8 product against float64 (close, not equal), requantizing after a weight sync
(copied or shared), parameter names and ties kept, the decoder's grouped int8 matmuls equal to each
module's own, the sampled tokens' log-probs the decoder returns against a full forward, the plan
(refusals, log-probs asked for, --print_plan) and one short GRPO run with the correction on."""

from __future__ import annotations

import math

import pytest
import torch
from _ray import ray_cluster  # noqa: F401  (session fixture)
from test_plan import rlhf_plan
from test_rl_loop import plugin, run  # noqa: F401  (the plugin fixture holds the `varied` reward)
from transformers import AutoModelForCausalLM

from swiftray.arguments import ArgumentError
from swiftray.models.generation import HFEngine, SamplingParams
from swiftray.models.int8_linear import Int8Linear, available, int8_matmul, int8_pack, quantize_linears
from swiftray.models.logprobs import completion_logprobs
from swiftray.placement import Cluster, Node
from swiftray.plan import describe

pytestmark = pytest.mark.skipif(not available(), reason="no fbgemm int8 kernels in this torch build")

PROMPTS = [[5, 17, 300, 41, 9], [77, 8, 8, 1000, 23, 56, 99, 12]]


def load(tiny_model_dir, quantized: bool):
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if quantized:
        quantize_linears(model)
    return model


def test_the_int8_product_is_close_to_float64_and_not_equal():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(5, 3, 64, generator=g)
    want = x.double() @ weight.double().T + bias.double()
    got = int8_matmul(x, int8_pack(weight, bias))
    assert got.shape == (5, 3, 96) and got.dtype == torch.float32
    error = (got.double() - want).norm() / want.norm()
    assert 0 < error < 0.02  # int8 weights and 7-bit activations: about 1% of the output


def test_weights_are_requantized_after_a_sync_copied_or_shared():
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(32, 16)
    layer = Int8Linear(linear)
    x = torch.randn(4, 32, generator=g)
    first = layer(x)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 32, generator=g))  # in place: same pointer, new version
    copied = layer(x)
    want = torch.nn.functional.linear(x, linear.weight, linear.bias)
    assert not torch.allclose(copied, first) and (copied - want).norm() / want.norm() < 0.02
    linear.weight.data = torch.randn(16, 32, generator=g)  # a new tensor (the shared-memory sync)
    want = torch.nn.functional.linear(x, linear.weight, linear.bias)
    assert (layer(x) - want).norm() / want.norm() < 0.02


def test_quantizing_keeps_names_ties_and_refuses_other_dtypes(tiny_model_dir):
    plain, model = load(tiny_model_dir, False), load(tiny_model_dir, True)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    if plain.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(RuntimeError, match="must be float32 on CPU"):
        quantize_linears(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16))


def test_the_decoder_groups_int8_matmuls_with_the_modules_numbers(tiny_model_dir):
    engine = HFEngine(load(tiny_model_dir, True), _Tokenizer())
    decoder = engine.static
    assert decoder is not None and decoder.int8 and not decoder.use_packed
    decoder._repack()
    attn = engine.model.model.layers[0].self_attn
    x = torch.randn(3, 1, attn.q_proj.in_features)
    grouped = decoder._linear(x, attn.q_proj, attn.k_proj, attn.v_proj)
    for out, module in zip(grouped, (attn.q_proj, attn.k_proj, attn.v_proj)):
        torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 1


def test_sampled_logprobs_match_a_full_forward_of_the_same_engine(tiny_model_dir):
    fp32 = load(tiny_model_dir, False)
    for quantized, tolerance in ((False, 1e-4), (True, 0.1)):
        engine = HFEngine(load(tiny_model_dir, quantized), _Tokenizer())
        params = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=0, logprobs=True)
        completions = engine.generate(PROMPTS, params)
        prompts = [PROMPTS[c.prompt_index] for c in completions]
        tokens = [c.token_ids for c in completions]
        forward = completion_logprobs(engine.model, prompts, tokens, 0)
        policy = completion_logprobs(fp32, prompts, tokens, 0)
        diffs, to_policy = [], []
        for c, full, pol in zip(completions, forward, policy):
            assert len(c.logprobs) == len(c.token_ids) == len(full)
            diffs += [abs(a - b) for a, b in zip(c.logprobs, full)]
            to_policy += [abs(a - b) for a, b in zip(c.logprobs, pol)]
        assert max(diffs) < tolerance, (quantized, max(diffs))
        # int8 samples from a slightly different distribution than the fp32 policy: visible, and small.
        assert (0.001 < sum(to_policy) / len(to_policy) < 0.1) if quantized else max(to_policy) < 1e-4
    unasked = HFEngine(load(tiny_model_dir, True), _Tokenizer()).generate(PROMPTS, SamplingParams(max_new_tokens=4))
    assert all(c.logprobs is None for c in unasked)


def test_a_synced_int8_engine_generates_what_a_fresh_one_does(tiny_model_dir):
    source, target = load(tiny_model_dir, False), load(tiny_model_dir, True)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    fresh = load(tiny_model_dir, False)
    fresh.load_state_dict(source.state_dict())
    want = [c.token_ids for c in HFEngine(fresh, _Tokenizer(), quantization="int8").generate(PROMPTS, greedy)]
    engine = HFEngine(target, _Tokenizer())
    before = [c.token_ids for c in engine.generate(PROMPTS, greedy)]
    for share in (False, True):
        engine.load_weights({k: v.clone() for k, v in source.state_dict().items()}, share=share)
        assert [c.token_ids for c in engine.generate(PROMPTS, greedy)] == want, share
    assert before != want


def test_the_plan_asks_for_logprobs_and_refuses_what_cannot_run(tiny_model_dir):
    cpu = Cluster((Node(4, 0),), "test")
    plan = rlhf_plan(tiny_model_dir, cpu, "--reward_funcs", "accuracy", "--rollout_quantization", "int8", nproc=1)
    rollout = plan.role("rollout").config
    assert rollout.quantization == "int8" and rollout.return_logprobs and rollout.torch_dtype == "float32"
    assert plan.role("policy").config.engine_dtype is None  # the policy sends float32; the engine quantizes
    assert "hf (int8 weights)" in describe(plan)
    refused = {"vLLM quantizes by its own options": ("--use_vllm", "true"), "generates no rollouts": ("--rlhf_type", "dpo"),
               "take float32 activations": ("--rollout_dtype", "bfloat16")}
    for message, flags in refused.items():
        with pytest.raises(ArgumentError, match=f"--rollout_quantization int8: .*{message}"):
            rlhf_plan(tiny_model_dir, cpu, "--reward_funcs", "accuracy", "--rollout_quantization", "int8", *flags,
                      nproc=1)
    with pytest.raises(ArgumentError, match="on GPUs use vLLM"):
        rlhf_plan(tiny_model_dir, Cluster((Node(4, 1),), "test"), "--reward_funcs", "accuracy",
                  "--rollout_quantization", "int8", nproc=1)


def test_an_int8_engine_is_measured_and_corrected_end_to_end(ray_cluster, tiny_model_dir, plugin, tmp_path):  # noqa: F811
    _, lines = run(tmp_path / "int8", tiny_model_dir, "--rollout_quantization", "int8",
                   "--rollout_importance_sampling_mode", "token_truncate",
                   "--rollout_importance_sampling_threshold", "1.01", plugin=plugin)
    for line in lines:  # the int8 engine's mismatch is measured every step, then capped
        assert 1e-5 < line["train/rollout_correction/k3_kl"] < 0.05
        assert 0.005 < line["train/rollout_correction/max_abs_logprob_diff"] < 1.0
        assert line["train/rollout_correction/is_weight_mean"] <= 1.01 and math.isfinite(line["train/loss"])
