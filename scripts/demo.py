"""The demo: a tiny model learns arithmetic by SFT, then improves by GRPO.

    1. build the tiny Qwen3-style model and tokenizer (offline);
    2. `swiftray sft` on the built-in `swiftray/arithmetic:easy_train`, stopped as soon as greedy
       accuracy on `easy_val` reaches --sft_target, so that by design the model knows the format
       but is far from mastery, whatever the seed;
    3. held-out greedy accuracy on `easy_test` (never trained on, never used to stop);
    4. `swiftray rlhf --rlhf_type grpo --reward_funcs accuracy format` from the SFT checkpoint;
    5. held-out greedy accuracy again; the reward curve is in the GRPO run's images/ folder.

Run: `python scripts/demo.py` (or `bash scripts/demo.sh`, which sets up first).
`--noise_reward` swaps the reward for random noise: the control that must show no gain.
`--rollout_dtype bfloat16 --rollout_importance_sampling_mode token_truncate`: GRPO with a bf16 rollout
engine beside the fp32 policy, corrected by truncated importance sampling; `--rollout_quantization int8`
in place of the dtype: an engine with int8 weights (docs/demo_runs.md has both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from swiftray.arguments import RlhfArguments, SftArguments  # noqa: E402
from swiftray.cli_parser import parse_args  # noqa: E402


def heldout_accuracy(model_dir: Path, dataset: str, n: int, max_new_tokens: int) -> float:
    """Greedy accuracy on the first n held-out problems, scored by the accuracy reward."""
    import torch

    from swiftray.data.loader import load_datasets
    from swiftray.data.template import Template
    from swiftray.models.generation import HFEngine, SamplingParams
    from swiftray.models.inference import load_inference_model
    from swiftray.rewards import build_reward_funcs

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = list(load_datasets([dataset], shuffle=False))[:n]
    model, tokenizer = load_inference_model(str(model_dir))
    template = Template(tokenizer)
    prompts = [template.encode_prompt(r["messages"][:-1]) for r in rows]
    outs = HFEngine(model, tokenizer, batch_size=64).generate(
        prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    rewards = build_reward_funcs(["accuracy"])
    per_func, _ = rewards.score(texts, {"solution": [r["solution"] for r in rows]})
    return sum(per_func["accuracy"]) / len(rows)


def last_checkpoint(run_dir: Path) -> Path:
    from swiftray.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"no checkpoint in {run_dir}")
    return ckpt


def sft_until(model_dir: Path, work: Path, opts: argparse.Namespace) -> tuple[Path, list[tuple[int, float]]]:
    """SFT in chunks (resuming each time) until validation accuracy reaches --sft_target.

    The stop reads `easy_val`, a slice of the training distribution that is neither trained on
    nor reported; the held-out `easy_test` plays no part in it. A constant learning rate makes
    chunked training identical to one long run.
    """
    from swiftray.controller import run_sft

    ckpt, curve = None, []
    for steps in range(opts.sft_chunk, opts.sft_max_steps + 1, opts.sft_chunk):
        flags = [
            "--model", str(model_dir), "--train_type", "full", "--dataset", "swiftray/arithmetic:easy_train",
            "--max_steps", str(steps), "--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1",
            "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "20",
            "--gradient_checkpointing", "false", "--save_steps", str(opts.sft_chunk), "--logging_steps", "25",
            "--eval_strategy", "no", "--report_to", "none", "--seed", str(opts.seed),
            "--output_dir", str(work / "sft"),
        ]
        if ckpt is not None:
            flags += ["--resume_from_checkpoint", str(ckpt)]
        ckpt = last_checkpoint(run_sft(parse_args(SftArguments, flags)))
        val = heldout_accuracy(ckpt, "swiftray/arithmetic:easy_val", 100, 48)
        curve.append((steps, val))
        print(f"\n== SFT step {steps}: validation accuracy {val:.1%}\n", flush=True)
        if val >= opts.sft_target:
            break
    return ckpt, curve


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="demo")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sft_chunk", type=int, default=50, help="SFT steps between validation checks")
    p.add_argument("--sft_max_steps", type=int, default=600)
    p.add_argument("--sft_target", type=float, default=0.3, help="stop SFT at this validation accuracy")
    p.add_argument("--grpo_steps", type=int, default=100)
    p.add_argument("--grpo_lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sft_checkpoint", default=None, help="skip SFT and start GRPO from this checkpoint")
    p.add_argument("--noise_reward", action="store_true", help="control: reward replaced by random noise")
    p.add_argument("--rollout_dtype", choices=("bfloat16", "float16", "float32"),
                   help="GRPO: the rollout engine's dtype (the policy stays float32)")
    p.add_argument("--rollout_quantization", choices=("int8",),
                   help="GRPO: the rollout engine decodes with int8 copies of its weights (CPU)")
    p.add_argument("--rollout_importance_sampling_mode",
                   choices=("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
                   help="GRPO: correct the engine's mismatch with the policy by importance sampling")
    opts = p.parse_args(argv)
    work = Path(opts.work_dir)
    start = time.time()

    from swiftray.models.tiny import make_tiny_model

    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, seed=opts.seed, hidden_size=128, num_layers=4, intermediate_size=512)

    if opts.sft_checkpoint:
        sft_ckpt, sft_curve = Path(opts.sft_checkpoint), []
    else:
        sft_ckpt, sft_curve = sft_until(model_dir, work, opts)
    test = "swiftray/arithmetic:easy_test"
    before = heldout_accuracy(sft_ckpt, test, 300, 48)
    print(f"\n== held-out greedy accuracy after SFT: {before:.1%}\n", flush=True)

    from swiftray.controller import run_rlhf

    rewards = ["accuracy", "format"]
    plugin_args: list[str] = []
    if opts.noise_reward:
        rewards = ["demo_noise"]
        plugin_args = ["--external_plugins", str(Path(__file__).with_name("plugins") / "noise_reward.py")]
    for flag in ("rollout_dtype", "rollout_quantization", "rollout_importance_sampling_mode"):
        if getattr(opts, flag):
            plugin_args += [f"--{flag}", getattr(opts, flag)]
    grpo_args = parse_args(RlhfArguments, [
        "--rlhf_type", "grpo", "--model", str(sft_ckpt), "--train_type", "full",
        "--dataset", "swiftray/arithmetic:easy_train", "--max_steps", str(opts.grpo_steps),
        "--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "1",
        "--num_generations", "8", "--max_completion_length", "48", "--temperature", str(opts.temperature),
        "--learning_rate", str(opts.grpo_lr), "--lr_scheduler_type", "constant", "--beta", "0.0",
        "--reward_funcs", *rewards, *plugin_args,
        "--gradient_checkpointing", "false", "--save_steps", str(opts.grpo_steps), "--logging_steps", "5",
        "--eval_strategy", "no", "--report_to", "none", "--seed", str(opts.seed),
        "--output_dir", str(work / "grpo"),
    ])
    grpo_run = run_rlhf(grpo_args)
    after = heldout_accuracy(last_checkpoint(grpo_run), test, 300, 48)
    result = {"seed": opts.seed, "sft_validation_curve": sft_curve, "accuracy_after_sft": before,
              "accuracy_after_grpo": after, "gain_points": round(100 * (after - before), 1),
              "noise_reward": opts.noise_reward, "rollout_dtype": opts.rollout_dtype,
              "rollout_quantization": opts.rollout_quantization,
              "rollout_importance_sampling_mode": opts.rollout_importance_sampling_mode, "minutes": round((time.time() - start) / 60, 2),
              "reward_curve": str(grpo_run / "images" / "train_reward.png")}
    print(f"\n== held-out greedy accuracy on {test}: after SFT {before:.1%} -> after GRPO {after:.1%} "
          f"({result['gain_points']:+.1f} points) in {result['minutes']} min", flush=True)
    print(json.dumps(result, indent=2))
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
