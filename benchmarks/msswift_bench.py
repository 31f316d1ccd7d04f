"""ms-swift as a contender, run in its own environment (benchmarks/.env-msswift, made by run.sh):

    benchmarks/.env-msswift/bin/python benchmarks/msswift_bench.py sft --model DIR --data FILE --out DIR

ms-swift 4.6 pins `trl==0.29.1` and `datasets<4.8.5`, so it cannot share a venv with TRL 1.16 or
swiftray; this file imports neither swiftray nor the newer TRL, only benchmarks/harness.py and the
timing helpers of sft_bench.py (which are plain Python).

`sft`: `swift sft` on the same local model and JSONL rows as the other SFT contenders, in the same
order (`--dataset_shuffle false --train_dataloader_shuffle false`), batch 8, max_length 256, AdamW
lr 1e-4 constant, weight decay 0.1, clip 1.0, full parameters, no gradient checkpointing. ms-swift
renders the rows with its own `qwen3` template, so its token counts differ slightly from the
others'; the rate counts each contender's own real (non-pad) tokens.

`grpo`: `swift rlhf --rlhf_type grpo` with transformers generation (no vLLM on this CPU), the same
start checkpoint, prompts, rewards (ms-swift's built-in `accuracy` and `format`, the same rules as
swiftray's) and settings as grpo_bench.py.

Both print one `RESULT {...}` line, as every contender does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.grpo_bench import step_summary  # noqa: E402
from benchmarks.harness import emit  # noqa: E402
from benchmarks.sft_bench import TORCH_DTYPE, add_sft_options, summarize  # noqa: E402


def instrument_trainer(tokens: list[int], ends: list[float], losses: list[float],
                       rewards: list[float] | None = None) -> None:
    """Every transformers Trainer ms-swift builds records its step ends, real tokens, losses and (GRPO)
    mean rewards."""
    import transformers
    from transformers import TrainerCallback

    train = transformers.Trainer.train

    class StepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
            if logs and "reward" in logs and rewards is not None:
                rewards.append(float(logs["reward"]))

    def timed_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        collate = self.data_collator

        def counted(features: list[dict]) -> dict:
            batch = collate(features)
            if not isinstance(batch, dict):  # GRPO's collator hands the rows through: nothing to count
                return batch
            mask = batch.get("attention_mask")
            ids = batch.get("input_ids")
            # Padding-free batches carry no 2-D mask: every token in the row is real.
            tokens.append(int(mask.sum()) if mask is not None and mask.dim() == 2 else int(ids.numel()))
            return batch

        self.data_collator = counted
        self.add_callback(StepEnd())
        return train(self, *args, **kwargs)

    transformers.Trainer.train = timed_train


def common_flags(opts: argparse.Namespace) -> list[str]:
    return ["--model", opts.model, "--model_type", "qwen3", "--template", "qwen3", "--tuner_type", "full",
            "--torch_dtype", TORCH_DTYPE[opts.precision], "--attn_impl", "sdpa", "--output_dir", str(opts.out),
            "--max_steps", str(opts.steps), "--learning_rate", str(opts.lr), "--lr_scheduler_type", "constant",
            "--warmup_ratio", "0", "--weight_decay", "0.1", "--max_grad_norm", "1.0",
            "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false", "--logging_steps", "1",
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--seed", "42",
            "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--dataset_shuffle", "false",
            "--train_dataloader_shuffle", "false", "--split_dataset_ratio", "0", "--load_from_cache_file", "false",
            "--use_hf", "true", "--disable_tqdm", "true"]


def run_sft(opts: argparse.Namespace) -> dict[str, Any]:
    from swift.pipelines import sft_main

    tokens: list[int] = []
    ends: list[float] = []
    losses: list[float] = []
    instrument_trainer(tokens, ends, losses)
    start = time.perf_counter()
    sft_main(common_flags(opts) + [
        "--dataset", str(opts.data), "--max_length", str(opts.max_length), "--truncation_strategy", "delete",
        "--per_device_train_batch_size", str(opts.batch), "--packing", str(bool(opts.packing)).lower(),
        "--loss_scale", "default"])
    return summarize(ends, tokens, losses, start)


def run_grpo(opts: argparse.Namespace) -> dict[str, Any]:
    from swift.pipelines import rlhf_main

    tokens: list[int] = []
    ends: list[float] = []
    losses: list[float] = []
    rewards: list[float] = []
    instrument_trainer(tokens, ends, losses, rewards)
    start = time.perf_counter()
    rlhf_main(common_flags(opts) + [
        "--rlhf_type", "grpo", "--dataset", str(opts.data), "--reward_funcs", "accuracy", "format",
        "--per_device_train_batch_size", str(opts.num_generations), "--num_generations", str(opts.num_generations),
        "--max_completion_length", str(opts.max_completion_length), "--temperature", "1.0",
        "--beta", str(opts.beta), "--loss_type", "grpo", "--use_vllm", "false", "--max_length", "512"])
    return {**step_summary(ends, rewards, start), "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("sft", "grpo"))
    add_sft_options(p)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--max_completion_length", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    opts = p.parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    result = run_sft(opts) if opts.mode == "sft" else run_grpo(opts)
    from importlib.metadata import version

    result.update(contender="msswift", mode=opts.mode, packing=bool(opts.packing), precision=opts.precision,
                  steps=opts.steps, threads=torch.get_num_threads(), ms_swift=version("ms-swift"))
    emit(result)


if __name__ == "__main__":
    main()
