"""Helpers for the end-to-end SFT, infer and export tests: run `swiftray sft` in-process, read its logs.

`run_sft` runs in the test process, so it joins the session's Ray cluster (`ray_cluster`)
instead of starting one per run.
"""

from __future__ import annotations

import json
from pathlib import Path

from swiftray.arguments import SftArguments
from swiftray.cli_parser import parse_args

# Flags every test run shares: small, quiet, one thread per worker. A worker given two CPUs uses
# two threads, which on a busy 2-core box is several times slower than one.
QUIET = ["--gradient_checkpointing", "false", "--num_cpus_per_worker", "1", "--logging_steps", "1",
         "--dataset_num_proc", "1"]


def sft_args(model: Path | str, output_dir: Path | str, *flags: object) -> SftArguments:
    """Parsed `swiftray sft` flags, as the CLI would build them."""
    return parse_args(SftArguments, ["--model", str(model), "--output_dir", str(output_dir), *QUIET,
                                     *[str(f) for f in flags]])


def run_sft(model: Path | str, output_dir: Path | str, *flags: object) -> Path:
    """Train in this process; return the run folder (output_dir/vN-...)."""
    from swiftray.controller import run_sft as _run_sft

    return _run_sft(sft_args(model, output_dir, *flags))


def read_log(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "logging.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_by_step(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric (e.g. "train/loss", "eval/loss") from logging.jsonl."""
    return {rec["step"]: rec[key] for rec in read_log(run_dir) if key in rec}
