"""The static-cache sampling loop against transformers: same logits at every step, same greedy tokens,
stop handling, weight syncs noticed, and top-k / top-p semantics."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swiftray.models import static_decode
from swiftray.models.generation import HFEngine, SamplingParams
from swiftray.models.static_decode import StaticCacheDecoder, sample

PROMPTS = [[5, 17, 300, 41, 9], [77, 8, 8, 1000, 23, 56, 99, 12], [400]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def hf_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_every_step_logits_match_a_full_forward(model, monkeypatch):
    seen = []
    real_sample = static_decode.sample
    monkeypatch.setattr(static_decode, "sample", lambda logits, *a: seen.append(logits.clone()) or real_sample(
        logits, *a))
    torch.manual_seed(0)
    results = StaticCacheDecoder(model).generate(PROMPTS, 2, 6, stop_ids=[], pad_id=0, temperature=1.0)
    for step, logits in enumerate(seen):
        for row, (tokens, _, _) in enumerate(results):
            prefix = torch.tensor([PROMPTS[row // 2] + tokens[:step]])
            with torch.no_grad():
                want = model(input_ids=prefix).logits[0, -1].double()
            torch.testing.assert_close(logits[row].double(), want, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_and_stops_match_generate(model):
    decoder = StaticCacheDecoder(model)
    results = decoder.generate(PROMPTS, 2, 12, stop_ids=[], pad_id=0, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        want = hf_greedy(model, prompt, 12)
        assert results[2 * i] == (want, "length", None) and results[2 * i + 1] == (want, "length", None)

    # Stop on prompt 0's 4th greedy token: its rows end there (stop token included); the others go on
    # (two of six rows stopped early exercise the row-dropping path once more rows stop).
    stop_tok = hf_greedy(model, PROMPTS[0], 12)[3]
    stopped = decoder.generate(PROMPTS, 2, 12, stop_ids=[stop_tok], pad_id=0, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        want = hf_greedy(model, prompt, 12)
        cut = want.index(stop_tok) + 1 if stop_tok in want else None
        expected = (want[:cut], "stop", None) if cut else (want, "length", None)
        assert stopped[2 * i] == expected and stopped[2 * i + 1] == expected


def test_a_weight_sync_is_seen(tiny_model_dir, model):
    from swiftray.models.tiny import make_tiny_model

    other_dir = make_tiny_model(tiny_model_dir.parent / "other_seed", seed=1)
    other = AutoModelForCausalLM.from_pretrained(other_dir).eval()
    mine = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = HFEngine(mine, _Tok())
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = [c.token_ids for c in engine.generate(PROMPTS, greedy)]
    assert before[0] == hf_greedy(mine, PROMPTS[0], 8)[:len(before[0])]
    engine.load_weights(other.state_dict())
    after = [c.token_ids for c in engine.generate(PROMPTS, greedy)]
    for prompt, got in zip(PROMPTS, after):
        assert got == hf_greedy(other, prompt, 8)[:len(got)]


class _Tok:
    pad_token_id = 0
    eos_token_id = 1


def test_engine_orders_and_stops_like_generate(model, monkeypatch):
    params = SamplingParams(max_new_tokens=10, temperature=0.0, n=2, stop_token_ids=[hf_greedy(model, PROMPTS[1], 10)[2]])
    fast = HFEngine(model, _Tok(), batch_size=4).generate(PROMPTS, params)  # 2 prompts per call: chunking
    monkeypatch.setenv("SWIFTRAY_STATIC_DECODE", "0")
    slow_engine = HFEngine(model, _Tok(), batch_size=4)
    assert slow_engine.static is None
    slow = slow_engine.generate(PROMPTS, params)
    assert [(c.prompt_index, c.token_ids, c.finish_reason) for c in fast] == \
        [(c.prompt_index, c.token_ids, c.finish_reason) for c in slow]


def test_top_k_and_top_p_keep_the_right_tokens():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().float().repeat(4000, 1)
    top_p = sample(logits, 1.0, None, 0.8)  # smallest set with mass >= 0.8: tokens 0 and 1
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).double().mean().item() - 0.5 / 0.8) < 0.03
    top_k = sample(logits, 1.0, 3, None)
    assert set(top_k.tolist()) == {0, 1, 2}
    assert abs((top_k == 2).double().mean().item() - 0.15 / 0.95) < 0.03
    assert sample(logits[:2], 0.0, None, None).tolist() == [0, 0]  # temperature 0: greedy
