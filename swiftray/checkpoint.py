"""The output tree, atomic checkpoints and resume.

    output_dir/vN-YYYYMMDD-HHMMSS/
        args.json  logging.jsonl  runs/ (tensorboard)  images/
        checkpoint-STEP/  weights (safetensors), tokenizer, args.json, trainer_state.json

A checkpoint is written to a hidden `.checkpoint-STEP.tmp` folder and renamed
into place only when complete, so a crash mid-save leaves the previous
checkpoint as the latest one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def args_to_dict(args: Any) -> dict[str, Any]:
    data = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    for extra in ("world_size",):
        if hasattr(args, extra):
            data[extra] = getattr(args, extra)
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_run_dir(output_dir: str, add_version: bool = True) -> Path:
    """ms-swift's `output_dir/vN-YYYYMMDD-HHMMSS`, N one above the highest already there."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not add_version:
        return root
    versions = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^v(\d+)-", p.name))]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"v{max(versions, default=-1) + 1}-{stamp}"
    run_dir.mkdir()
    return run_dir


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}"


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where a checkpoint is written before it is complete."""
    path = Path(run_dir) / f".checkpoint-{step}.tmp"
    if path.exists():
        shutil.rmtree(path)  # left by a crash: never half-valid
    path.mkdir(parents=True)
    return path


def commit_checkpoint(staging: Path, final: Path) -> Path:
    """Make a fully written checkpoint visible in one rename."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: Path, limit: int | None, best: Path | None) -> list[Path]:
    """Keep at most `limit` checkpoints, always the best and the latest (as transformers does)."""
    ckpts = list_checkpoints(run_dir)
    if not limit or len(ckpts) <= limit:
        return []
    keep = {ckpts[-1]}
    if best is not None:
        keep.add(Path(best))
    removable = [p for p in ckpts if p not in keep]
    removed = removable[: max(0, len(ckpts) - max(limit, len(keep)))]
    for path in removed:
        shutil.rmtree(path)
    return removed


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: not a swiftray checkpoint (no {TRAINER_STATE})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_args(ckpt_or_run: str | Path) -> dict[str, Any]:
    path = Path(ckpt_or_run) / "args.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)
