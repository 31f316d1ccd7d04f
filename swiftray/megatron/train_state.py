"""Per-rank optimizer, scheduler and RNG state for resuming a Megatron run, as safetensors + JSON.

The weights themselves are the checkpoint's canonical tensors (any layout loads them). What
only this rank knows is saved next to them in `train_state/`:

    rank_R.safetensors   the inner torch optimizer's main parameters and moments (this rank's
                         DistributedOptimizer shard), the torch RNG and the named RNG states
    rank_R.json          step, scheduler counters, Python/NumPy RNG, and the parallel layout

megatron-core keeps a separate optimizer for expert parameters (a ChainedOptimizer); each
inner optimizer's tensors are saved under its index. Resuming needs the same layout and world
size (the shards must line up), which is checked. Nothing here is a pickle.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (one per chained optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [opt.optimizer for opt in chained]


def optimizer_tensors(optimizer: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, inner in enumerate(inner_optimizers(optimizer)):
        params = [p for group in inner.param_groups for p in group["params"]]
        for i, param in enumerate(params):
            out[f"opt{k}.param{i}"] = param.detach().cpu().contiguous()
            for key, value in inner.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"opt{k}.param{i}.{key}"] = value.detach().cpu().reshape(value.shape or (1,)).contiguous()
    return out


@torch.no_grad()
def restore_optimizer(optimizer: Any, tensors: dict[str, torch.Tensor]) -> None:
    for k, inner in enumerate(inner_optimizers(optimizer)):
        params = [p for group in inner.param_groups for p in group["params"]]
        for i, param in enumerate(params):
            name = f"opt{k}.param{i}"
            if name not in tensors or tuple(tensors[name].shape) != tuple(param.shape):
                raise ValueError(f"optimizer state: {name} missing or of another shape; resume with the "
                                 "layout and world size that saved it")
            param.copy_(tensors[name])
            state = inner.state[param]
            prefix = name + "."
            for key in [n.removeprefix(prefix) for n in tensors if n.startswith(prefix)]:
                value = tensors[prefix + key].to(param.device)
                state[key] = value.reshape(()) if key == "step" else value


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor part, JSON part) of every RNG this rank uses, megatron's named states included."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tensors = {"torch": torch.get_rng_state()}
    for name, state in get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = state.cpu() if isinstance(state, torch.Tensor) else torch.as_tensor(state)
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, values, gauss_py = random.getstate()
    meta = {"python": [version, list(values), gauss_py], "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    tracker = {n.removeprefix("tracker."): t for n, t in tensors.items() if n.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
    version, values, gauss_py = meta["python"]
    random.setstate((version, tuple(values), gauss_py))
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save(folder: Path, rank: int, *, optimizer: Any, scheduler: Any, step: int, layout: dict[str, Any],
         save_optim: bool = True, save_rng: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"step": step, "layout": layout, "scheduler": scheduler.state_dict(),
                            "has_optim": save_optim, "has_rng": save_rng}
    if save_optim:
        tensors.update(optimizer_tensors(optimizer))
    if save_rng:
        rng_tensors, meta["rng"] = rng_state()
        tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
    save_file(tensors, str(folder / f"rank_{rank}.safetensors"))
    (folder / f"rank_{rank}.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def load(folder: Path, rank: int, *, optimizer: Any, scheduler: Any, layout: dict[str, Any],
         load_optim: bool = True, load_rng: bool = True) -> int:
    """Restore what `save` wrote for this rank; returns the step."""
    meta_path = folder / f"rank_{rank}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no training state for rank {rank} (saved by fewer ranks, or "
                                "with save_only_model); load its weights as a model instead of resuming")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta["layout"] != layout:
        raise ValueError(f"{folder}: saved with layout {meta['layout']}, this run has {layout}")
    tensors = load_file(str(folder / f"rank_{rank}.safetensors"))
    if load_optim and meta.get("has_optim"):
        restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("opt")})
    scheduler.load_state_dict(meta["scheduler"])
    if load_rng and meta.get("has_rng"):
        set_rng_state({k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"])
    return int(meta["step"])
