"""HF <-> megatron-core checkpoints on disk (`swiftray export --to_mcore true` / `--to_hf true`).

A megatron-core checkpoint here is a folder of safetensors holding the model's canonical
tensors (megatron-core names at TP = PP = EP = 1, `hf_map.py`), beside the HF config.json and
tokenizer files it came from:

    mcore_config.json                         {"format": "swiftray-mcore", "version": 1, ...}
    mcore_model.safetensors                   (or -0000i-of-0000n shards + .index.json)
    config.json, generation_config.json, tokenizer files

Any TP/PP/EP layout loads it (each rank slices what it holds, `sharding.py`), and
`swiftray megatron sft --save` writes the same format, so its checkpoints convert back too.
(This is not Megatron-LM's own `torch_dist` layout, whose metadata is a pickle: nothing read
back from disk here can run code.) Conversion only concatenates and slices, so a round trip
is bit-exact; the conversion itself needs neither megatron-core nor torch.distributed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swiftray.megatron import hf_map

MCORE_CONFIG = "mcore_config.json"
MCORE_WEIGHTS = "mcore_model"
HF_WEIGHTS = "model"
FORMAT = "swiftray-mcore"
logger = logging.getLogger("swiftray")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
SHARD_BYTES = 4 << 30


class SafetensorsFolder:
    """Tensors of `<stem>.safetensors` or its sharded form (`<stem>.safetensors.index.json`), by name."""

    def __init__(self, folder: str | Path, stem: str) -> None:
        self.folder = Path(folder)
        single = self.folder / f"{stem}.safetensors"
        index = self.folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            self.files = {name: single.name for name in _keys(single)}
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index (expected a 'weight_map' object)") from err
            self.files = dict(weight_map)
        else:
            raise FileNotFoundError(f"{self.folder}: no {single.name} or {index.name}")
        self._handles: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str):
        if name not in self.files:
            raise KeyError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_slice(self, name: str):
        """A lazy view whose indexing reads only the selected rows/columns from disk."""
        return self._handle(name).get_slice(name)


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def write_safetensors(folder: str | Path, stem: str, named: Iterable[tuple[str, torch.Tensor]],
                      shard_bytes: int = SHARD_BYTES, metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as `<stem>.safetensors`, or as HF-style shards plus an index past `shard_bytes`."""
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().cpu().contiguous()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{stem}.safetensors"), metadata=meta)
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, str(folder / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return names


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def is_mcore_dir(folder: str | Path) -> bool:
    return (Path(folder) / MCORE_CONFIG).is_file()


def read_mcore_config(folder: str | Path) -> dict[str, Any]:
    meta = read_json(Path(folder) / MCORE_CONFIG)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{Path(folder) / MCORE_CONFIG}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def model_shape_of(folder: str | Path) -> hf_map.ModelShape:
    """The model's shape from the config.json of an HF or megatron-core folder."""
    return hf_map.model_shape(read_json(Path(folder) / "config.json"))


def copy_side_files(src: Path, dst: Path) -> None:
    """config.json, tokenizer and generation files: everything but weights and our own metadata."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != MCORE_CONFIG:
            shutil.copy2(path, dst / path.name)


def _staged(out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return out, staging


def _commit(staging: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def write_mcore_dir(folder: str | Path, named: Iterable[tuple[str, torch.Tensor]], *, source: str | Path,
                    extra: dict[str, Any] | None = None) -> None:
    """Write canonical tensors and metadata into `folder` (which exists), side files from `source`."""
    folder = Path(folder)
    write_safetensors(folder, MCORE_WEIGHTS, named)
    copy_side_files(Path(source), folder)
    meta = {"format": FORMAT, "version": 1, **(extra or {})}
    (folder / MCORE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an HF Qwen3 / Qwen3-MoE folder to a megatron-core checkpoint folder; returns it."""
    hf_dir = Path(hf_dir)
    shape = model_shape_of(hf_dir)
    source = SafetensorsFolder(hf_dir, HF_WEIGHTS)
    out, staging = _staged(out_dir)
    write_mcore_dir(staging, hf_map.hf_to_canonical(source.get, shape), source=hf_dir,
                    extra={"converted_from": str(hf_dir.resolve())})
    return _commit(staging, out)


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a megatron-core checkpoint folder (converted, or saved by training) to an HF folder."""
    mcore_dir = Path(mcore_dir)
    read_mcore_config(mcore_dir)
    shape = model_shape_of(mcore_dir)
    source = SafetensorsFolder(mcore_dir, MCORE_WEIGHTS)
    out, staging = _staged(out_dir)
    write_safetensors(staging, HF_WEIGHTS, hf_map.canonical_to_hf(source.get, shape))
    copy_side_files(mcore_dir, staging)
    return _commit(staging, out)


class CanonicalReader:
    """Canonical megatron-core tensors by name from a folder in either format (HF folders are mapped
    on the fly, so training can start from an HF model without a separate conversion)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.shape = model_shape_of(self.folder)
        self.is_mcore = is_mcore_dir(self.folder)
        if self.is_mcore:
            read_mcore_config(self.folder)
        self.files = SafetensorsFolder(self.folder, MCORE_WEIGHTS if self.is_mcore else HF_WEIGHTS)

    def get(self, name: str) -> torch.Tensor:
        if self.is_mcore:
            return self.files.get(name)
        return hf_map.canonical_from_hf(name, self.files.get, self.shape)


def check_export_args(args: Any) -> None:
    """`swiftray export --to_mcore true` / `--to_hf true`: the flags each direction needs."""
    from swiftray.arguments import ArgumentError

    if args.to_mcore and args.to_hf:
        raise ArgumentError("--to_mcore and --to_hf are opposite directions; pass one")
    if args.adapters or args.merge_lora or args.push_to_hub:
        raise ArgumentError("--to_mcore / --to_hf convert full weights; they do not take --adapters, --merge_lora "
                            "or --push_to_hub")
    source = args.model if args.to_mcore else args.mcore_model
    flag = "--model" if args.to_mcore else "--mcore_model"
    if not source:
        raise ArgumentError(f"{'--to_mcore' if args.to_mcore else '--to_hf'} true needs {flag} (a local folder)")
    if not os.path.isdir(source):
        raise ArgumentError(f"{flag} {source}: no such folder")
    if args.to_hf and not is_mcore_dir(source):
        raise ArgumentError(f"--mcore_model {source}: no {MCORE_CONFIG} there (not a megatron-core folder)")
    if args.to_mcore and is_mcore_dir(source):
        raise ArgumentError(f"--model {source} is already a megatron-core folder")
    if not args.output_dir:
        name = os.path.basename(os.path.normpath(source))
        args.output_dir = f"{name}-mcore" if args.to_mcore else f"{name.removesuffix('-mcore')}-hf"


def run_conversion(args: Any) -> Path:
    if args.to_mcore:
        out = hf_to_mcore(args.model, args.output_dir)
    else:
        out = mcore_to_hf(args.mcore_model, args.output_dir)
    logger.info("%s written to %s", "megatron-core checkpoint" if args.to_mcore else "HF model", out)
    return out
