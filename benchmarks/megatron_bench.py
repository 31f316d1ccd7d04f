"""Megatron backend against DeepSpeed ZeRO-3: SFT loss tokens/s on the tiny MoE model, two CPU ranks.

    python benchmarks/megatron_bench.py [--steps 6] [--repeats 1] [--work benchmarks/work/megatron]

Contenders train the same model (a tiny Qwen3-MoE from `make_tiny_model(moe=True)`: 4 experts, top-2)
on the same rows in the same order (`swiftray/arithmetic`, no shuffling), 8 samples per optimizer
step, max_length 256, fp32, constant learning rate 1e-5, no activation recomputation, each through
its CLI entry point in a process of its own with NPROC_PER_NODE=2:

    megatron EP 2        `swiftray megatron sft --expert_model_parallel_size 2` (DP 2, micro-batch 4)
    megatron TP 2 + SP   `swiftray megatron sft --tensor_model_parallel_size 2 --sequence_parallel true`
                         (DP 1, micro-batch 4 x 2 accumulation)
    deepspeed zero3      `swiftray sft --train_type full --deepspeed zero3` (2 ranks, micro-batch 4)

Rate = loss tokens of steps 2..N (logging.jsonl's train/num_tokens) over the time between the log
lines of step 1 and step N (elapsed_s): step 1 carries one-off warm-up. The 1-minute load average is
recorded before each run: this machine is shared, and a loaded machine slows every contender.
The results go to benchmarks/work/megatron/results.json and to their section of RESULTS.md.
Not run yet (written while the shared machine's load average was 10-60): its section of RESULTS.md
comes with its first run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.harness import write_section  # noqa: E402

COMMON_SFT = ["--dataset", "swiftray/arithmetic#400", "--dataset_shuffle", "false", "--max_length", "256",
              "--report_to", "none"]


def contenders(hf: Path, mcore: Path, steps: int) -> dict[str, list[str]]:
    megatron = ["megatron", "sft", "--load", str(mcore), *COMMON_SFT, "--micro_batch_size", "4",
                "--global_batch_size", "8", "--train_iters", str(steps), "--log_interval", "1", "--lr", "1e-5",
                "--lr_decay_style", "constant", "--recompute_granularity", "none", "--save_interval", "100000",
                "--no_save_optim", "true", "--torch_dtype", "float32"]
    return {
        "megatron EP 2": megatron + ["--expert_model_parallel_size", "2"],
        "megatron TP 2 + SP": megatron + ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"],
        "deepspeed zero3": ["sft", "--model", str(hf), "--train_type", "full", "--deepspeed", "zero3", *COMMON_SFT,
                            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                            "--max_steps", str(steps), "--logging_steps", "1", "--learning_rate", "1e-5",
                            "--lr_scheduler_type", "constant", "--gradient_checkpointing", "false",
                            "--save_strategy", "no", "--eval_strategy", "no", "--torch_dtype", "float32"],
    }


def run_one(name: str, argv: list[str], out: Path) -> dict[str, Any]:
    """One contender's run; its rate from the run folder's logging.jsonl."""
    shutil.rmtree(out, ignore_errors=True)  # one run folder per contender and repeat
    out.mkdir(parents=True)
    flag = "--save" if argv[0] == "megatron" else "--output_dir"
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHONPATH": str(REPO), "SWIFTRAY_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "swiftray", *argv, flag, str(out)], env=env, cwd=out,
                          capture_output=True, text=True)
    wall = time.time() - start
    (out / "stderr.log").write_text(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    (run,) = [p for p in out.glob("v*-*") if p.is_dir()]
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    tokens = [r["train/num_tokens"] for r in rows]
    seconds = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    return {"contender": name, "tokens_per_s": sum(tokens[1:]) / seconds, "steps": len(rows),
            "loss_tokens_per_step": statistics.mean(tokens), "first_loss": rows[0]["train/loss"],
            "last_loss": rows[-1]["train/loss"], "wall_s": wall, "load_before": load, "load_after": os.getloadavg()[0]}


def section(results: list[dict[str, Any]], steps: int) -> str:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["contender"], []).append(r)
    zero3 = statistics.median(r["tokens_per_s"] for r in by_name["deepspeed zero3"])
    lines = ["## 7. Megatron backend against DeepSpeed ZeRO-3 (tiny MoE, SFT, 2 CPU ranks)", "",
             "Written by `python benchmarks/megatron_bench.py` (raw: `benchmarks/work/megatron/results.json`). "
             f"Tiny Qwen3-MoE (4 experts, top-2), `swiftray/arithmetic` in file order, 8 samples per step, "
             f"max_length 256, fp32, lr 1e-5 constant, {steps} steps; rate = loss tokens of steps 2..{steps} over "
             "their time. Load: 1-minute load average before / after each run (2 cores; above 2 the machine "
             "was shared and every figure is slowed).", "",
             "| contender | loss tokens/s | x ZeRO-3 | loss tokens/step | loss step 1 | loss last step | run wall s | "
             "load before/after | runs |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_name.items():
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        loads = ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in runs)
        lines.append(f"| {name} | {rate:,.1f} | {rate / zero3:.2f} | {runs[0]['loss_tokens_per_step']:,.0f} | "
                     f"{runs[0]['first_loss']:.3f} | {runs[0]['last_loss']:.3f} | "
                     f"{statistics.median(r['wall_s'] for r in runs):.0f} | {loads} | {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "megatron")
    opts = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from swiftray.megatron.convert import hf_to_mcore
    from swiftray.models.tiny import make_tiny_model

    work = opts.work.resolve()
    hf = work / "tiny-qwen3-moe"
    if not (hf / "config.json").is_file():
        make_tiny_model(hf, moe=True)
    mcore = work / "tiny-qwen3-moe-mcore"
    if not (mcore / "mcore_config.json").is_file():
        hf_to_mcore(hf, mcore)
    results = []
    for repeat in range(opts.repeats):
        for name, argv in contenders(hf, mcore, opts.steps).items():
            result = run_one(name, argv, work / "runs" / f"{name.replace(' ', '_').replace('+', '')}-{repeat}")
            print(json.dumps(result), flush=True)
            results.append(result)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    write_section("megatron_bench", section(results, opts.steps))


if __name__ == "__main__":
    main()
