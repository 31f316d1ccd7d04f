"""The policy's resumable training state, in files that cannot run code (safetensors and JSON).

    checkpoint-STEP/train_state/
        train_state.json           step, world size, backend, the optimizer's parameter groups
                                   (hyperparameters and the names of their parameters), the LR
                                   scheduler's state, the non-finite step counters
        trainable.safetensors      every trainable parameter, whole, in the optimizer's precision
                                   (DeepSpeed: the fp32 master weights)
        optimizer.safetensors      "<parameter name>/<key>": AdamW's exp_avg, exp_avg_sq and step
        rng_rank_<r>.safetensors   rank r's torch RNG state (uint8); python's and numpy's as JSON
                                   in the file's metadata

Rank 0 gathers and writes everything but the RNG files; every rank reads the whole state and
keeps its own shard. Keyed by parameter name, the state does not depend on how a backend
shards it, so a checkpoint resumes on a different number of ranks. Earlier swiftray versions
wrote `rank_N.pt` pickles and torch.distributed.checkpoint / DeepSpeed folders: those are
refused, never unpickled, since a pickle can run code when loaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = "swiftray.train_state"
VERSION = 1
META = "train_state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
SEPARATOR = "/"  # between parameter name and state key; never part of a parameter name

OptimState = dict[str, dict[str, torch.Tensor]]


def rng_file(rank: int) -> str:
    return f"rng_rank_{rank}.safetensors"


# --- writing (rank 0, except the RNG files) ---------------------------------------------------
def write(path: str | Path, meta: dict[str, Any], weights: dict[str, torch.Tensor], optim: OptimState) -> None:
    """Write train_state.json, trainable.safetensors and optimizer.safetensors into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save(weights, path / TRAINABLE)
    flat = {f"{name}{SEPARATOR}{key}": value for name, state in optim.items() for key, value in state.items()}
    _save(flat, path / OPTIMIZER)
    with open(path / META, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "version": VERSION, **meta}, f, indent=2)


def write_rng(path: str | Path, rank: int) -> None:
    """This process's python, numpy and torch (and CUDA) RNG states."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    metadata = {"python": json.dumps([version, list(mt_state), gauss]),
                "numpy": json.dumps([name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(Path(path) / rng_file(rank)), metadata=metadata)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[name] = tensor
    save_file(out, str(path))


# --- reading (every rank) ---------------------------------------------------------------------
def read_meta(ckpt: str | Path) -> dict[str, Any]:
    """train_state/train_state.json of a checkpoint folder, checked; clear errors for what is not one."""
    ckpt = Path(ckpt)
    path = ckpt / "train_state" / META
    if not path.is_file():
        legacy = sorted(p.name for p in ckpt.glob("rank_*.pt")) if ckpt.is_dir() else []
        if legacy:
            raise ValueError(
                f"{ckpt}: its training state ({', '.join(legacy)}, train_state/) is in the pickle format of an "
                "earlier swiftray, which is not loaded because unpickling can run code; resume from a "
                "checkpoint written by this version, or start from its weights with --model / --adapters"
            )
        raise FileNotFoundError(
            f"{path}: missing, so {ckpt} cannot be resumed (saved with --save_only_model, or not a complete "
            "checkpoint); load its weights as a model/adapter instead"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a swiftray training state (expected \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: format version {meta.get('version')!r}, this swiftray reads version {VERSION}")
    for key, kind in (("global_step", int), ("world_size", int), ("param_groups", list), ("scheduler", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: field {key!r} missing or not a{'n' if kind is int else ''} "
                             f"{kind.__name__}")
    return meta


def read_tensors(ckpt: str | Path, names: list[str]) -> tuple[dict[str, torch.Tensor], OptimState]:
    """Trainable weights and optimizer state; every name in `names` must be there, nothing else."""
    folder = Path(ckpt) / "train_state"
    weights = _load(folder / TRAINABLE)
    _check_names(folder / TRAINABLE, set(weights), names)
    flat = _load(folder / OPTIMIZER)
    optim: OptimState = {}
    for key, value in flat.items():
        name, sep, state_key = key.rpartition(SEPARATOR)
        if not sep:
            raise ValueError(f"{folder / OPTIMIZER}: entry {key!r} is not '<parameter>{SEPARATOR}<state key>'")
        optim.setdefault(name, {})[state_key] = value
    if optim:  # empty when saved before the first optimizer step
        _check_names(folder / OPTIMIZER, set(optim), names)
    return weights, optim


def read_rng(ckpt: str | Path, rank: int, saved_world_size: int) -> dict[str, Any]:
    """The RNG states saved by the same rank (rank % saved ranks when the count changed), checked."""
    path = Path(ckpt) / "train_state" / rng_file(rank % saved_world_size)
    tensors = _load(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        version, mt_state, gauss = json.loads(metadata["python"])
        name, keys, pos, has_gauss, cached = json.loads(metadata["numpy"])
        state = {"python": (int(version), tuple(int(k) for k in mt_state), None if gauss is None else float(gauss)),
                 "numpy": (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
                 "torch": tensors["torch"],
                 "cuda": [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")),
                                                     key=lambda k: int(k[5:]))]}
        # Try them now, so that a malformed state fails before any rank changes anything.
        current = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        try:
            set_rng({**state, "cuda": []})
        finally:
            set_rng({**current, "cuda": []})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a valid RNG state ({type(err).__name__}: {err})") from None
    return state


def get_rng() -> dict[str, Any]:
    """This process's RNG states in the form set_rng takes (an in-memory snapshot's)."""
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the checkpoint's training state is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None


def _check_names(path: Path, found: set[str], wanted: list[str]) -> None:
    missing = [n for n in wanted if n not in found]
    extra = sorted(found - set(wanted))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} trainable parameter(s) of this model, e.g. {missing[0]!r}")
        if extra:
            parts.append(f"holds {len(extra)} this model does not train, e.g. {extra[0]!r}")
        raise ValueError(f"{path}: {' and '.join(parts)}; resume with the same model and --train_type "
                         "(and LoRA settings) as the run that saved it")


def to_json(value: Any) -> Any:
    """Optimizer hyperparameters as JSON: tensors to numbers, tuples to lists."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer setting of type {type(value).__name__} cannot be saved as JSON: {value!r:.80}")


def from_json_group(group: dict[str, Any]) -> dict[str, Any]:
    """The inverse of to_json for one param group: lists (betas) back to tuples."""
    return {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
