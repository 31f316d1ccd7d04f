"""One SFT contender, run in its own process: `python benchmarks/sft_bench.py --contender swiftray ...`.

Contenders train the same model on the same rows in the same order (no shuffling), batch 8,
max_length 256, no gradient checkpointing, constant LR, AdamW (weight decay 0.1, clip 1.0), at the
precision `--precision` names (fp32, bf16 weights, or fp32 weights under bf16 autocast):

    swiftray   `swiftray sft` (the CLI entry point, in this process as its driver)
    trl        TRL's SFTTrainer
    hf         transformers' Trainer with a padding collator (no packing there)

All read token ids and loss masks made by swiftray's template, so the sequences and the loss
tokens are identical. Prints one `RESULT {...}` line: per-step end times, real (non-pad) tokens
and losses, and the steady-state rate over steps 2..N (step 1 carries one-off warm-up).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import emit, read_jsonl, step_end_recorder  # noqa: E402


def encoded_rows(model: str, data: Path, max_length: int) -> list[dict[str, list[int]]]:
    """input_ids and labels from swiftray's template: the same tokens for every contender."""
    from transformers import AutoTokenizer

    from swiftray.data.template import SampleTooLongError, Template

    template = Template(AutoTokenizer.from_pretrained(model), max_length=max_length)
    rows = []
    for row in read_jsonl(data):
        try:
            rows.append(template.encode(row["messages"]))
        except SampleTooLongError:
            continue
    return rows


def summarize(ends: list[float], tokens: list[int], losses: list[float], start: float) -> dict[str, Any]:
    """Steady state: real tokens of steps 2..N over the time from the end of step 1 to the end of step N."""
    n = min(len(ends), len(tokens))
    rate = sum(tokens[1:n]) / (ends[n - 1] - ends[0]) if n > 1 else float("nan")
    step_s = [b - a for a, b in zip(ends[:n - 1], ends[1:n])]
    return {"tokens_per_s": rate, "step_s": step_s, "real_tokens": tokens[:n], "losses": losses,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "startup_s": ends[0] - start if ends else None}


# weights' dtype for each --precision (bf16_autocast: fp32 weights, the matmuls in bf16)
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "bf16_autocast": "float32"}


# --- swiftray ---------------------------------------------------------------------------------------

def run_swiftray(opts: argparse.Namespace) -> dict[str, Any]:
    from swiftray.cli import main as swiftray_main
    from swiftray.data.batching import StepBatcher
    from swiftray.tracking import Tracker

    tokens: list[int] = []
    ends: list[float] = []
    losses: list[float] = []
    next_step = StepBatcher.next_step

    def counted_next_step(self: StepBatcher) -> Any:
        units = self._units[self.position:self.position + self.units_per_step]
        if len(units) < self.units_per_step:
            units = units + self._units[: self.units_per_step - len(units)]
        tokens.append(sum(len(self.samples[i]["input_ids"]) for unit in units for i in unit))
        return next_step(self)

    advance, log = Tracker.advance, Tracker.log

    def timed_advance(self: Tracker, *a: Any, **k: Any) -> None:
        ends.append(time.perf_counter())
        advance(self, *a, **k)

    def logged(self: Tracker, step: int, metrics: dict, **k: Any) -> None:
        if "loss" in metrics and k.get("prefix") == "train/":
            losses.append(float(metrics["loss"]))
        log(self, step, metrics, **k)

    StepBatcher.next_step, Tracker.advance, Tracker.log = counted_next_step, timed_advance, logged
    if opts.workers > 1:
        os.environ["NPROC_PER_NODE"] = str(opts.workers)
    per_device = opts.batch // opts.workers
    start = time.perf_counter()
    swiftray_main([
        "sft", "--model", opts.model, "--train_type", "full", "--dataset", str(opts.data),
        "--dataset_shuffle", "false", "--max_length", str(opts.max_length),
        "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "1",
        "--max_steps", str(opts.steps), "--learning_rate", str(opts.lr), "--lr_scheduler_type", "constant",
        "--weight_decay", "0.1", "--max_grad_norm", "1.0", "--torch_dtype", TORCH_DTYPE[opts.precision],
        "--attn_impl", "sdpa",
        "--gradient_checkpointing", "false", "--packing", str(opts.packing).lower(),
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "1",
        "--seed", "42", "--output_dir", str(opts.out),
    ])
    return summarize(ends, tokens, losses, start)


# --- TRL SFTTrainer and transformers Trainer ---------------------------------------------------------

def _trainer_common(opts: argparse.Namespace) -> dict[str, Any]:
    return dict(output_dir=str(opts.out), max_steps=opts.steps, per_device_train_batch_size=opts.batch,
                gradient_accumulation_steps=1, learning_rate=opts.lr, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0, bf16=opts.precision != "fp32", fp16=False,
                gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
                report_to="none", seed=42, data_seed=42, dataloader_num_workers=0, disable_tqdm=True,
                train_sampling_strategy="sequential")


def _instrument(trainer: Any, tokens: list[int], ends: list[float]) -> None:
    collate = trainer.data_collator

    def counted(features: list[dict]) -> dict:
        batch = collate(features)
        mask = batch.get("attention_mask")
        # Padding-free (packed) batches carry no attention mask: every token in the row is real.
        tokens.append(int(mask.sum()) if mask is not None and mask.dim() == 2 else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counted
    trainer.add_callback(step_end_recorder(ends))


def _losses(trainer: Any) -> list[float]:
    return [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


def run_trl(opts: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = encoded_rows(opts.model, opts.data, opts.max_length)
    # Loss on the tokens swiftray's template marks (the assistant turns): TRL's completion_mask.
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
                            for r in rows])
    start = time.perf_counter()
    config = SFTConfig(**_trainer_common(opts), max_length=opts.max_length, packing=opts.packing,
                       completion_only_loss=True, shuffle_dataset=False, dataset_num_proc=None)
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=TORCH_DTYPE[opts.precision],
                                                 attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(opts.model))
    tokens: list[int] = []
    ends: list[float] = []
    _instrument(trainer, tokens, ends)
    trainer.train()
    return summarize(ends, tokens, _losses(trainer), start)


def run_hf(opts: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    if opts.packing:
        raise SystemExit("transformers' Trainer has no packing of its own")
    rows = encoded_rows(opts.model, opts.data, opts.max_length)
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    pad = tokenizer.pad_token_id

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad)
        labels = torch.full((len(features), width), -100)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=TORCH_DTYPE[opts.precision],
                                                 attn_implementation="sdpa")
    args = TrainingArguments(**_trainer_common(opts), remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate)
    tokens: list[int] = []
    ends: list[float] = []
    _instrument(trainer, tokens, ends)
    trainer.train()
    return summarize(ends, tokens, _losses(trainer), start)


def add_sft_options(p: argparse.ArgumentParser) -> None:
    """The options every SFT contender takes (ms-swift's script, in its own venv, too)."""
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--packing", type=int, default=0)
    p.add_argument("--precision", choices=list(TORCH_DTYPE), default="fp32",
                   help="fp32; bf16: bf16 weights and matmuls (swiftray --torch_dtype bfloat16, TRL/Trainer "
                        "with a bf16 model and bf16=True); bf16_autocast: fp32 weights, bf16 matmuls under "
                        "autocast (TRL/Trainer bf16=True with an fp32 model)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the TRL / Trainer process")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contender", choices=("swiftray", "trl", "hf"), required=True)
    add_sft_options(p)
    p.add_argument("--workers", type=int, default=1, help="swiftray: policy workers sharing the cores")
    opts = p.parse_args()
    opts.packing = bool(opts.packing)
    if opts.contender == "swiftray" and opts.precision == "bf16_autocast":
        raise SystemExit("swiftray trains in the model's dtype: --precision fp32 or bf16")
    import torch

    if opts.contender != "swiftray":
        torch.set_num_threads(opts.threads)
    result = {"swiftray": run_swiftray, "trl": run_trl, "hf": run_hf}[opts.contender](opts)
    result.update(contender=opts.contender, packing=opts.packing, precision=opts.precision, steps=opts.steps,
                  workers=opts.workers,
                  threads=torch.get_num_threads())
    emit(result)


if __name__ == "__main__":
    main()
