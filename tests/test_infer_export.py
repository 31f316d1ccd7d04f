"""`swiftray infer` and `swiftray export` on a LoRA checkpoint that `swiftray sft` wrote.

infer: interactive turns from stdin (multi-turn history, `clear`, `--stream`), batch mode over
--val_dataset into --result_path, and the sampling flags reaching transformers' generate.
export: --merge_lora gives a plain transformers folder with base + adapter logits;
--push_to_hub fails fast, with a clear message, when the hub cannot be reached.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ray import REPO, ray_cluster  # noqa: F401
from _sft import run_sft
from safetensors.torch import load_file
from transformers import AutoTokenizer

from swiftray import checkpoint as ckpt
from swiftray.arguments import ExportArguments, InferArguments
from swiftray.cli_parser import parse_args
from swiftray.data.builtin import arithmetic_split
from swiftray.export import run_export
from swiftray.infer import run_infer, sampling_params
from swiftray.models.generation import HFEngine
from swiftray.models.inference import load_inference_model


@pytest.fixture(scope="module")
def lora_ckpt(ray_cluster, tiny_model_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The last checkpoint of a short LoRA run (a high learning rate, so the adapter is far from zero)."""
    run = run_sft(tiny_model_dir, tmp_path_factory.mktemp("lora"), "--train_type", "lora",
                  "--learning_rate", "5e-3", "--dataset", "swiftray/arithmetic#32", "--max_steps", 6,
                  "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1, "--report_to", "none")
    return ckpt.latest_checkpoint(run)


def peft_and_base(model_dir: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                     adapter).eval()
    return peft, base


class Recorder(io.StringIO):
    """A stdout that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.num_writes = 0

    def write(self, text: str) -> int:
        self.num_writes += 1
        return super().write(text)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_interactive_multi_turn_clear_and_stream(lora_ckpt, tiny_model_dir, monkeypatch, stream):
    out = Recorder()
    calls = []  # (prompt ids, completion ids, stdout writes during generation)
    real_generate = HFEngine.generate

    def spy(self, prompts, params, streamer=None):
        before = out.num_writes
        result = real_generate(self, prompts, params, streamer=streamer)
        calls.append((prompts[0], result[0].token_ids, out.num_writes - before))
        return result

    monkeypatch.setattr(HFEngine, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 3?\n\nAnd 4 + 4?\nclear\nWhat is 2 + 3?\nexit\nunread\n"))
    monkeypatch.setattr(sys, "stdout", out)
    args = parse_args(InferArguments, ["--adapters", lora_ckpt, "--stream", str(stream).lower(),
                                       "--max_new_tokens", 12])
    assert args.model == str(tiny_model_dir)  # the base model comes from the checkpoint's args.json
    assert run_infer(args) is None

    text = out.getvalue()
    tokenizer = AutoTokenizer.from_pretrained(lora_ckpt)
    assert len(calls) == 3  # the blank line is skipped; nothing after `exit` is read
    first, second, third = (tokenizer.decode(prompt) for prompt, _, _ in calls)
    assert first.count("<|im_start|>user") == 1 and "What is 2 + 3?" in first
    # The second turn carries the first question and answer.
    assert second.startswith(first.removesuffix("<|im_start|>assistant\n"))
    assert second.count("<|im_start|>user") == 2 and second.count("<|im_start|>assistant") == 2
    assert "And 4 + 4?" in second
    assert "history cleared" in text and calls[2][0] == calls[0][0]  # `clear` forgets the turns
    # A prompt per line read; after each question its answer, whole, then a rule.
    turns = text.split("<<< ")
    assert len(turns) == 7 and turns[2] == "" and turns[4] == "history cleared\n" and turns[6] == ""
    for turn, (_, completion, writes) in zip([turns[1], turns[3], turns[5]], calls):
        answer = tokenizer.decode(completion, skip_special_tokens=True)
        assert len(completion) <= 12 and turn == f"{answer}\n{'-' * 40}\n"
        if not stream:
            assert writes == 0  # printed after generation, not during it
    if stream:  # printed while generating, in pieces
        assert max(writes for _, _, writes in calls) >= 2


def test_batch_infer_writes_responses_and_labels(lora_ckpt, tiny_model_dir, tmp_path):
    result_path = tmp_path / "infer" / "result.jsonl"
    args = parse_args(InferArguments, ["--adapters", lora_ckpt, "--val_dataset", "swiftray/arithmetic:test#5",
                                       "--result_path", result_path, "--max_new_tokens", 8,
                                       "--max_batch_size", 2])
    returned = run_infer(args)

    records = [json.loads(line) for line in result_path.read_text(encoding="utf-8").splitlines()]
    assert records == returned and len(records) == 5
    truth = {row["messages"][0]["content"]: row for row in arithmetic_split("test")}
    peft, _ = peft_and_base(tiny_model_dir, lora_ckpt)
    tokenizer = AutoTokenizer.from_pretrained(lora_ckpt)
    for rec in records:
        question = rec["messages"][0]["content"]
        assert rec["labels"] == truth[question]["messages"][1]["content"]
        assert rec["solution"] == truth[question]["solution"]  # other columns are kept
        # The response is the adapter model's greedy answer (computed here with plain PEFT, unbatched).
        prompt = tokenizer.apply_chat_template(rec["messages"][:1], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            generated = peft.generate(input_ids=prompt, max_new_tokens=8, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert rec["response"] == tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)


def test_generation_flags_reach_generate(lora_ckpt, monkeypatch):
    args = parse_args(InferArguments, ["--adapters", lora_ckpt, "--temperature", "0.7", "--top_p", "0.8",
                                       "--top_k", 5, "--repetition_penalty", "1.3", "--max_new_tokens", 4,
                                       "--seed", 3])
    model, tokenizer = load_inference_model(args.model, args.adapters)
    engine = HFEngine(model, tokenizer)
    seen = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in ("What is 2 + 3?", "hello")]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    params = sampling_params(args)
    sampled = [c.token_ids for c in engine.generate(prompts, params)]
    assert {k: seen[0][k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                    "max_new_tokens")} == {"do_sample": True, "temperature": 0.7, "top_p": 0.8,
                                                           "top_k": 5, "repetition_penalty": 1.3,
                                                           "max_new_tokens": 4}
    assert all(1 <= len(ids) <= 4 for ids in sampled)
    assert [c.token_ids for c in engine.generate(prompts, params)] == sampled  # --seed makes sampling repeatable

    # Temperature 0 is greedy and deterministic; sampling from the top 1 token is the same thing.
    greedy_args = parse_args(InferArguments, ["--adapters", lora_ckpt, "--temperature", "0", "--max_new_tokens", 16])
    greedy = sampling_params(greedy_args)
    first = [c.token_ids for c in engine.generate(prompts, greedy)]
    assert seen[-1]["do_sample"] is False
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == first
    top1 = sampling_params(parse_args(InferArguments, ["--adapters", lora_ckpt, "--temperature", "1.0", "--top_k", 1,
                                                       "--max_new_tokens", 16, "--seed", 5]))
    assert [c.token_ids for c in engine.generate(prompts, top1)] == first


def test_merge_lora_matches_base_plus_adapter(lora_ckpt, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    merged_dir = run_export(parse_args(ExportArguments, ["--adapters", lora_ckpt, "--merge_lora", "true"]))
    assert merged_dir == Path(f"{lora_ckpt}-merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()

    lora_b = [t for name, t in load_file(lora_ckpt / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and max(t.abs().max().item() for t in lora_b) > 1e-3  # a trained, non-zero adapter
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    peft, base = peft_and_base(tiny_model_dir, lora_ckpt)
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        want, got, plain = peft(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the model ...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # ... and the merged model is base + adapter


def test_push_to_hub_offline_fails_fast(lora_ckpt):
    # An endpoint that never resolves (.invalid is reserved), so the test means "offline" on any machine.
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid", "PYTHONPATH": str(REPO)}
    # No retry loop: the subprocess timeout is the hang guard (wall-clock bounds are not asserted).
    proc = subprocess.run([sys.executable, "-m", "swiftray", "export", "--adapters", str(lora_ckpt),
                           "--push_to_hub", "true", "--hub_model_id", "x/y", "--use_hf", "true"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach the hub at https://hub.invalid" in proc.stderr
    assert "Traceback" not in proc.stderr
