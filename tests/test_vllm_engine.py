"""The vllm rollout engine against transformers on the tiny model.

Runs where vLLM is installed: on CPU that is .venv-vllm (scripts/test_vllm_cpu.sh); the main .venv
has no vLLM and skips this file. Tests marked `gpu` also need CUDA (sleep mode).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM  # noqa: E402

from swiftray.actors.vllm_engine import VLLMEngine  # noqa: E402
from swiftray.models.generation import HFEngine, SamplingParams  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXTS = ["Hello! How can I", "What is 7 + 3?", "The sun rises in the east and"]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


def randomise(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Redraw every matrix from N(0, std). The default init (std 0.02) gives near-flat logits and greedy
    text that repeats one token: a weak test. std 0.1 gives varied tokens with clear margins."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def reference_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion[i] | prompt + completion[:i]) by a plain float64 forward pass."""
    model64 = copy.deepcopy(model).double()
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model64(input_ids=ids).logits[0].double(), dim=-1)
    return [logp[len(prompt) + i - 1, tok].item() for i, tok in enumerate(completion)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharp_tiny") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    randomise(model, seed=1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> HFEngine:
    from swiftray.models.inference import load_inference_model

    model, tokenizer = load_inference_model(str(model_dir), torch_dtype="float32", device="cpu")
    return HFEngine(model, tokenizer)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> VLLMEngine:
    # One engine for the module: vLLM's in-process engine does not come up twice in one process.
    return VLLMEngine({"model_dir": str(model_dir), "torch_dtype": "float32", "seed": 0,
                       "vllm_max_model_len": 256, "vllm_enable_prefix_caching": True,
                       "sleep_level": 1 if torch.cuda.is_available() else 0})


@pytest.fixture(scope="module")
def prompts(hf: HFEngine) -> list[list[int]]:
    return [hf.tokenizer.encode(t) for t in TEXTS]


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="torch_dtype 'float8'"):
        VLLMEngine({"model_dir": "unused", "torch_dtype": "float8"})


def test_greedy_generation_equals_hf(engine: VLLMEngine, hf: HFEngine, prompts: list[list[int]]):
    ours, theirs = engine.generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
    assert [c.prompt_index for c in ours] == [0, 1, 2]
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.finish_reason for c in ours] == ["length"] * 3
    assert len(set(ours[0].token_ids)) > 4  # varied text, not one repeated token


def test_stop_token_ends_the_completion_and_is_kept(engine: VLLMEngine, hf: HFEngine, prompts: list[list[int]]):
    tokens = hf.generate(prompts[:1], GREEDY)[0].token_ids
    stop = tokens[3]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[stop])
    [completion] = engine.generate(prompts[:1], params)
    assert completion.finish_reason == "stop"
    assert completion.token_ids == tokens[:tokens.index(stop) + 1]


def test_completion_logprobs_match_float64_reference(engine: VLLMEngine, hf: HFEngine, prompts: list[list[int]]):
    completions = [c.token_ids[:10] for c in hf.generate(prompts, GREEDY)]
    completions[1] = [5, 900, 17, 1200]  # an unlikely continuation scores as exactly as a greedy one
    ours = engine.completion_logprobs(prompts, completions)
    for prompt, completion, values in zip(prompts, completions, ours):
        assert values == pytest.approx(reference_logprobs(hf.model, prompt, completion), abs=1e-4)


def test_sampling_gives_n_seeded_completions_per_prompt(engine: VLLMEngine, prompts: list[list[int]]):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=7)
    first = engine.generate(prompts, params)
    assert [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in first)
    assert len({tuple(c.token_ids) for c in first[:3]}) == 3  # the n samples of a prompt differ
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in first]
    other = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_streamer_receives_prompt_then_reply(engine: VLLMEngine, prompts: list[list[int]]):
    class Recorder:
        def __init__(self):
            self.puts: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.flatten().tolist())

        def end(self) -> None:
            self.ended = True

    recorder = Recorder()
    [completion] = engine.generate(prompts[:1], GREEDY, streamer=recorder)
    assert recorder.puts == [prompts[0], completion.token_ids] and recorder.ended


def test_weight_sync_in_buckets_matches_hf_on_the_new_weights(engine: VLLMEngine, hf: HFEngine,
                                                              prompts: list[list[int]]):
    original = {k: v.clone() for k, v in hf.model.state_dict().items()}
    completions = [c.token_ids[:10] for c in hf.generate(prompts, GREEDY)]
    before = engine.completion_logprobs(prompts, completions)

    new_model = copy.deepcopy(hf.model)
    randomise(new_model, seed=2)
    state = new_model.state_dict()  # HF names, lm_head.weight (tied) included as the policy sends it
    names = list(state)
    buckets = [{n: state[n] for n in names[i:i + 4]} for i in range(0, len(names), 4)]  # cuts blocks apart
    engine.load_weights(buckets[0])
    with pytest.raises(RuntimeError, match="weight sync incomplete"):
        engine.generate(prompts, GREEDY)
    for bucket in buckets[1:]:
        engine.load_weights(bucket)

    after = engine.completion_logprobs(prompts, completions)
    for prompt, completion, values, old in zip(prompts, completions, after, before):
        assert values == pytest.approx(reference_logprobs(new_model, prompt, completion), abs=1e-3)
        assert max(abs(a - b) for a, b in zip(values, old)) > 0.1  # the new weights are in use
    new_hf = HFEngine(new_model, hf.tokenizer)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == \
        [c.token_ids for c in new_hf.generate(prompts, GREEDY)]

    engine.load_weights(original)  # one bucket holding everything; leaves the engine as the module found it
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == \
        [c.token_ids for c in hf.generate(prompts, GREEDY)]


def test_sleep_and_wake_up_keep_generation(engine: VLLMEngine, hf: HFEngine, prompts: list[list[int]]):
    """A no-op on CPU (vLLM has no sleep mode there); on a GPU, level 1 offloads and restores weights."""
    engine.sleep(1)
    engine.wake_up()
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == \
        [c.token_ids for c in hf.generate(prompts, GREEDY)]


@pytest.mark.gpu
@needs_cuda
def test_sleep_level_2_frees_weights_and_a_sync_restores_them(engine: VLLMEngine, hf: HFEngine,
                                                              prompts: list[list[int]]):
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep(2)
    assert torch.cuda.mem_get_info()[0] > free_awake  # KV cache and weights left the GPU
    engine.wake_up()
    engine.load_weights(dict(hf.model.state_dict()))  # level 2 discarded the weights: the policy resends them
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == \
        [c.token_ids for c in hf.generate(prompts, GREEDY)]
