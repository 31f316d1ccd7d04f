"""The output tree, atomic checkpoints and resume.

    output_dir/vN-YYYYMMDD-HHMMSS/
        args.json  logging.jsonl  runs/ (tensorboard)  images/
        checkpoint-STEP/  weights (safetensors), tokenizer, args.json, trainer_state.json

A checkpoint is written to a hidden `.checkpoint-STEP.tmp` folder and renamed
into place only when complete, so a crash mid-save leaves the previous
checkpoint as the latest one.

Secrets never reach these files: a flag or setting whose name says token, key,
secret or password is written as "<redacted>", and the values of such flags and
environment variables are cut out of every other string too (`redact`). The
same goes for log lines once `install_secret_filter` has run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


REDACTED = "<redacted>"
# Words that mark a name as holding a secret (hub_token, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, db_password);
# whole words only, so that max_new_tokens or tokenizer are not secrets.
# ("tokens" is not one: max_new_tokens.)
SECRET_WORDS = frozenset({"token", "key", "keys", "secret", "secrets", "password", "passwords", "passwd", "apikey",
                          "credential", "credentials"})
MIN_SECRET_LENGTH = 6  # shorter values (flags like "1", "true") are not cut out of other strings


def is_secret_name(name: str) -> bool:
    return any(part in SECRET_WORDS for part in re.split(r"[^a-z0-9]+", str(name).lower()))


def secret_values(*sources: Mapping[str, Any] | None) -> set[str]:
    """String values held under secret names in the given mappings (args, os.environ, ...), nested too."""
    found: set[str] = set()

    def visit(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(str(key), item)
        elif isinstance(value, str) and is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH:
            found.add(value)
        elif isinstance(value, (list, tuple)) and is_secret_name(name):
            for item in value:
                visit(name, item)

    for source in sources:
        for key, value in (source or {}).items():
            visit(str(key), value)
    return found


def redact_text(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(secret, REDACTED)
    return text


def redact(data: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of `data` (dicts, lists, strings) without secrets: values under a secret name become
    "<redacted>" (None and empty values stay, they show that none was given), and known secret
    values (default: those in `data` and in os.environ) are cut out of every other string."""
    known = set(secret_values(data if isinstance(data, Mapping) else {}, os.environ) if secrets is None
                else secrets)

    def clean(value: Any, secret_name: bool) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v, secret_name or is_secret_name(str(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, secret_name) for v in value]
        if isinstance(value, str):
            return REDACTED if secret_name and value else redact_text(value, known)
        return value

    return clean(data, False)


class SecretFilter(logging.Filter):
    """Cuts known secret values out of log records (message and traceback) before any handler writes them."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = set(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = redact_text(message, self.secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact_text(record.exc_text, self.secrets)
        return True


def install_secret_filter(*sources: Mapping[str, Any] | None) -> SecretFilter:
    """Redact the secrets of `sources` (and of os.environ) from every handler of the root and
    "swiftray" loggers (console, log files); handlers added later need `handler.addFilter` too."""
    secret_filter = SecretFilter(secret_values(*sources, os.environ))
    for logger in (logging.getLogger(), logging.getLogger("swiftray")):
        for handler in logger.handlers:
            for old in [f for f in handler.filters if isinstance(f, SecretFilter)]:
                handler.removeFilter(old)
            handler.addFilter(secret_filter)
    return secret_filter


def args_to_dict(args: Any) -> dict[str, Any]:
    """The flags as written to args.json: secrets redacted."""
    data = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    for extra in ("world_size",):
        if hasattr(args, extra):
            data[extra] = getattr(args, extra)
    return redact(data)


def redact_json_file(path: str | Path) -> bool:
    """Rewrite a JSON file (an args.json from an older swiftray) without secrets; True if it changed."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    cleaned = redact(data)
    if cleaned == data:
        return False
    write_json(path, cleaned)
    return True


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# The run folder this process made last: where the CLI writes a failed run's traceback (error.log).
RUN_DIRS: list[Path] = []


def make_run_dir(output_dir: str, add_version: bool = True) -> Path:
    """ms-swift's `output_dir/vN-YYYYMMDD-HHMMSS`, N one above the highest already there."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not add_version:
        RUN_DIRS.append(root)
        return root
    versions = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^v(\d+)-", p.name))]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"v{max(versions, default=-1) + 1}-{stamp}"
    run_dir.mkdir()
    RUN_DIRS.append(run_dir)
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
