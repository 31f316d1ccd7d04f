"""Time to accuracy: minutes of GRPO until the model is better, swiftray against TRL's GRPOTrainer.

    python benchmarks/time_to_accuracy.py --sft_checkpoint DIR [--steps 100 --eval_every 20]

Both start from the same SFT checkpoint (the demo's: scripts/demo.py, or preference_learning.py's
seed work folder) and run the demo's GRPO: prompts of `swiftray/arithmetic:easy_train`, 64
completions per step (8 prompts x 8), 48 new tokens, temperature 1, top_k 50, lr 1e-4 constant,
beta 0, loss_type grpo, group-scaled advantages, rewards accuracy + format (swiftray's functions, handed
to TRL as callables). swiftray runs its sequential loop; `--async_generate true` has the rollout generate
the next batch while the policy trains (0.42x TRL's s/step against about 0.7x, but one step stale, it
reached the gains later: benchmarks/findings.md). Each saves a checkpoint every --eval_every steps and records the wall-clock
time of each step's end from its process's start (start-up included: the user waits for it too).

Afterwards every checkpoint's held-out greedy accuracy on the 300 `easy_test` problems is measured
(outside the timed runs), giving accuracy against minutes for both, one plot
(benchmarks/time_to_accuracy.png), and the minutes each needs to gain +5, +10, +15 and +20 points
(the first checkpoint at or past the gain). Results: benchmarks/work/time_to_accuracy.json; the
markdown section goes into RESULTS.md through report.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import (  # noqa: E402
    BENCH_DIR,
    WORK,
    emit,
    run_contender,
    step_end_recorder,
    thread_env,
    write_section,
)

TEST = "swiftray/arithmetic:easy_test"
GAINS = (5, 10, 15, 20)


def train_data(path: Path) -> Path:
    """The demo's training prompts as JSONL, so both contenders read the very same rows."""
    if not path.exists():
        from swiftray.data.loader import load_datasets

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for row in load_datasets(["swiftray/arithmetic:easy_train"], shuffle=False):
                f.write(json.dumps({"messages": row["messages"], "solution": row["solution"]}) + "\n")
    return path


# --- the timed runs (each in its own process) ------------------------------------------------------

def run_swiftray(opts: argparse.Namespace) -> dict[str, Any]:
    from swiftray.cli import main as swiftray_main
    from swiftray.tracking import Tracker

    ends: list[float] = []
    advance = Tracker.advance

    def timed_advance(self: Tracker, *a: Any, **k: Any) -> None:
        ends.append(time.perf_counter() - START)
        advance(self, *a, **k)

    Tracker.advance = timed_advance
    swiftray_main([
        "rlhf", "--rlhf_type", "grpo", "--model", opts.model, "--train_type", "full", "--dataset", str(opts.data),
        "--max_steps", str(opts.steps), "--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "1",
        "--num_generations", "8", "--max_completion_length", "48", "--temperature", "1.0", "--top_k", "50",
        "--learning_rate", str(opts.lr), "--lr_scheduler_type", "constant", "--beta", "0.0", "--loss_type", "grpo",
        "--reward_funcs", "accuracy", "format", "--gradient_checkpointing", "false",
        "--save_steps", str(opts.eval_every), "--save_only_model", "true", "--logging_steps", "5",
        "--eval_strategy", "no", "--report_to", "none", "--seed", str(opts.seed), "--add_version", "false",
        "--output_dir", str(opts.out), "--async_generate", str(opts.async_generate).lower()])
    return {"step_ends_s": ends}


def run_trl(opts: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.grpo_bench import prompt_texts, reward_functions

    torch.set_num_threads(opts.threads)
    rows = prompt_texts(opts.model, opts.data)
    ds = Dataset.from_list([{"prompt": r["prompt"], "solution": r["solution"]} for r in rows])
    config = GRPOConfig(
        output_dir=str(opts.out), max_steps=opts.steps, per_device_train_batch_size=64, gradient_accumulation_steps=1,
        num_generations=8, max_completion_length=48, temperature=1.0, top_k=50, top_p=1.0, learning_rate=opts.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0, beta=0.0, loss_type="grpo",
        scale_rewards="group", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=5,
        save_strategy="steps", save_steps=opts.eval_every, save_only_model=True, report_to="none", seed=opts.seed,
        dataloader_num_workers=0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype="float32", attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(), args=config, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(opts.model))
    ends: list[float] = []
    trainer.add_callback(step_end_recorder(ends, since=START))
    trainer.train()
    return {"step_ends_s": ends}


# --- the orchestrator ---------------------------------------------------------------------------------

def checkpoints(out: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in out.rglob("checkpoint-*") if (p / "config.json").exists()}


def minutes_to_gain(curve: list[dict[str, float]], base: float, gain: float) -> float | None:
    """Minutes at the first checkpoint whose accuracy is at least `gain` points above the start."""
    return next((p["minutes"] for p in curve if round(100 * (p["accuracy"] - base), 6) >= gain), None)


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH_DIR.parent / "scripts"))
    from demo import heldout_accuracy

    work = WORK / "time_to_accuracy"
    data = train_data(work / "train.jsonl")
    base = heldout_accuracy(Path(opts.sft_checkpoint), TEST, 300, 48)
    # The host's speed drifts between sessions (fp32 matmul GFLOP/s seen from 96 to 178 on 2 threads): record it.
    speed = run_contender([str(BENCH_DIR / "flops.py"), "--threads", str(opts.threads)],
                          env=thread_env(opts.threads, "PASSIVE"), timeout=600,
                          log_path=WORK / "logs" / "time_to_accuracy_matmul.log")
    result: dict[str, Any] = {"sft_checkpoint": opts.sft_checkpoint, "seed": opts.seed, "start_accuracy": base,
                              "steps": opts.steps, "eval_every": opts.eval_every,
                              "swiftray_async_generate": opts.async_generate,
                              "matmul_gflops_train_mlp": speed["matmul_gflops"]["train_mlp"], "contenders": {}}
    for contender in opts.contenders:
        out = work / contender
        shutil.rmtree(out, ignore_errors=True)  # checkpoints of an earlier run must not join this curve
        print(f"[tta] {contender}: {opts.steps} GRPO steps ...", flush=True)
        run = run_contender([str(Path(__file__).resolve()), "--train", contender, "--model", opts.sft_checkpoint,
                             "--data", str(data), "--out", str(out), "--steps", str(opts.steps), "--eval_every",
                             str(opts.eval_every), "--lr", str(opts.lr), "--seed", str(opts.seed),
                             "--threads", str(opts.threads), "--async_generate", str(opts.async_generate)],
                            env=thread_env(opts.threads, "PASSIVE"), timeout=3600,
                            log_path=WORK / "logs" / f"time_to_accuracy_{contender}.log")
        ends = run["step_ends_s"]
        curve = [{"step": 0, "minutes": 0.0, "accuracy": base}]
        for step, ckpt in sorted(checkpoints(out).items()):
            curve.append({"step": step, "minutes": ends[step - 1] / 60,
                          "accuracy": heldout_accuracy(ckpt, TEST, 300, 48)})
            print(f"[tta] {contender} step {step}: {curve[-1]}", flush=True)
        result["contenders"][contender] = {
            "curve": curve, "minutes_per_step": (ends[-1] - ends[0]) / (len(ends) - 1) / 60,
            "startup_minutes": ends[0] / 60, "peak_rss_tree_mb": run["peak_rss_tree_mb"],
            "load_average_1min": run["load_average_1min"],
            "minutes_to_gain": {str(g): minutes_to_gain(curve, base, g) for g in GAINS}}
    # One entry per GRPO seed: a run for another seed adds to the file instead of replacing it.
    saved = WORK / "time_to_accuracy.json"
    runs = json.loads(saved.read_text()).get("runs", {}) if saved.exists() else {}
    runs[str(opts.seed)] = result
    saved.write_text(json.dumps({"runs": runs}, indent=1))
    plot(runs, BENCH_DIR / "time_to_accuracy.png")
    write_section("time_to_accuracy", section(runs))
    return result


NAMES = {"swiftray": "swiftray rlhf", "trl": "TRL GRPOTrainer"}


def section(runs: dict[str, dict[str, Any]]) -> str:
    """RESULTS.md section 9 from every seed's run."""
    lines = ["## 9. Time to accuracy: GRPO minutes until the model is better", "",
             "Written by `python benchmarks/time_to_accuracy.py` (raw: `benchmarks/work/time_to_accuracy.json`; "
             "plot: `time_to_accuracy.png`). For each seed, the demo's GRPO from that seed's SFT checkpoint, both "
             "contenders from the same one, 64 completions per step, checkpoints scored afterwards on the 300 "
             "held-out `easy_test` problems (greedy). Minutes are wall-clock from the contender's launch (start-up "
             "included) to the end of the checkpoint's step."]
    summary = []
    for seed, result in sorted(runs.items()):
        base, c = result["start_accuracy"], result["contenders"]
        lines += ["", f"### Seed {seed}: from `{result['sft_checkpoint']}` (held-out accuracy {100 * base:.1f}%), "
                  f"{result['steps']} steps, a checkpoint every {result['eval_every']}", "",
                  f"swiftray ran with `--async_generate {str(result.get('swiftray_async_generate', False)).lower()}`; "
                  f"the host's fp32 matmul rate at the start: "
                  + (f"{result['matmul_gflops_train_mlp']:.0f} GFLOP/s." if "matmul_gflops_train_mlp" in result
                     else "not recorded."), "",
                  "| contender | " + " | ".join(f"minutes to +{g} points" for g in GAINS)
                  + " | final accuracy (change) | minutes per step | start-up minutes | peak RSS all procs MB | load |",
                  "|---|" + "---|" * (len(GAINS) + 5)]
        for name, r in c.items():
            final = r["curve"][-1]["accuracy"]
            reach = [f"{m:.1f}" if m is not None else "not reached" for m in r["minutes_to_gain"].values()]
            lines.append(f"| {NAMES[name]} | " + " | ".join(reach) + f" | {100 * final:.1f}% "
                         f"({100 * (final - base):+.1f}) | {r['minutes_per_step']:.3f} | {r['startup_minutes']:.2f} | "
                         f"{r['peak_rss_tree_mb']:,.0f} | " + "/".join(f"{x:.1f}" for x in r["load_average_1min"]) + " |")
        if {"swiftray", "trl"} <= set(c):
            ratios = [f"+{g}: {s / t:.2f}x" for g, s, t in zip(GAINS, c["swiftray"]["minutes_to_gain"].values(),
                                                                 c["trl"]["minutes_to_gain"].values()) if s and t]
            summary.append(f"seed {seed}: " + (", ".join(ratios) or "no gain both reached"))
        lines += ["", "| step | " + " | ".join(f"{NAMES[n]}: minutes, accuracy" for n in c) + " |",
                  "|---|" + "---|" * len(c)]
        for i, point in enumerate(max(c.values(), key=lambda r: len(r["curve"]))["curve"]):
            cells = [f"{r['curve'][i]['minutes']:.1f}, {100 * r['curve'][i]['accuracy']:.1f}%" if i < len(r["curve"])
                     else "-" for r in c.values()]
            lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    if summary:
        lines += ["", "swiftray's minutes over TRL's to each gain (target <= 0.5x): " + "; ".join(summary) + "."]
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, result in sorted(runs.items()):
        for name, c in result["contenders"].items():
            ax.plot([p["minutes"] for p in c["curve"]], [100 * p["accuracy"] for p in c["curve"]], marker="o",
                    linestyle="-" if name == "swiftray" else "--", label=f"{NAMES.get(name, name)}, seed {seed}")
    ax.set_xlabel("wall-clock minutes from launch")
    ax.set_ylabel("held-out greedy accuracy, % (300 problems)")
    ax.set_title("GRPO from the same SFT checkpoint")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_checkpoint", help="the start of both runs")
    p.add_argument("--contenders", nargs="+", default=["swiftray", "trl"], choices=["swiftray", "trl"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--async_generate", type=lambda v: v.lower() == "true", default=False,
                   help="swiftray's rollout generates the next batch while the policy trains: faster steps, "
                        "but here slower to the gain than the sequential loop (benchmarks/findings.md)")
    p.add_argument("--train", choices=["swiftray", "trl"], help=argparse.SUPPRESS)  # one timed run (internal)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.train:
        emit({"swiftray": run_swiftray, "trl": run_trl}[opts.train](opts))
        return
    if not opts.sft_checkpoint:
        p.error("--sft_checkpoint is required")
    print(json.dumps(measure(opts), indent=1))


if __name__ == "__main__":
    main()
