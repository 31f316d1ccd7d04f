"""The folders and files the flags name, checked on the driver before anything starts.

The run plan (plan.py) checks values; this checks that what they point at is there and readable,
so that a wrong path fails in a second with one line naming the flag and the file, rather than
inside an actor after Ray has started:

- model folders (--model, --ref_model, --teacher_model, --value_model): a config.json that parses,
  weights whose safetensors headers parse (a truncated or garbage file is named);
- adapter folders (--adapters, --ref_adapters): an adapter_config.json;
- --resume_from_checkpoint: a swiftray checkpoint whose training state is JSON and safetensors (the
  pickles of earlier versions are refused without being opened), saved from the same model and
  train type as this run's.

Only headers and JSON are read; nothing here loads weights or unpickles anything.
"""

from __future__ import annotations

import json
import os
from typing import Any

from swiftray.arguments import ArgumentError

MODEL_FLAGS = ("model", "ref_model", "teacher_model", "value_model")
ADAPTER_FLAGS = ("adapters", "ref_adapters")
# config.json fields that must agree between a full-weight checkpoint and the model a run resumes with.
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads")


def read_json_object(path: str, flag: str) -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the flag and the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArgumentError(f"{flag}: {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"{flag}: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model_folder(flag: str, path: str) -> None:
    """A local Hugging Face model folder: config.json, and safetensors files whose headers parse."""
    if not os.path.isdir(path):
        raise ArgumentError(f"--{flag} {path}: no such folder (a local model folder; no model hub is used)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ArgumentError(f"--{flag} {path}: no config.json there (expected a Hugging Face model folder)")
    read_json_object(config, f"--{flag}")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            check_safetensors_header(os.path.join(path, name), f"--{flag}")


def check_safetensors_header(path: str, flag: str) -> None:
    """The header parses and its tensors fit in the file (a truncated or garbage file fails); no data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ArgumentError(f"{flag}: {path}: not a valid safetensors file ({err})") from None


def check_adapter_folder(flag: str, path: str) -> None:
    if not os.path.isdir(path):
        raise ArgumentError(f"--{flag} {path}: no such folder")
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        raise ArgumentError(f"--{flag} {path}: no adapter_config.json there (expected a LoRA checkpoint folder)")
    read_json_object(config, f"--{flag}")


def check_checkpoint(path: str) -> None:
    """A checkpoint a run can resume from (before its model is known: its args.json may name it)."""
    from swiftray.actors import train_state
    from swiftray.checkpoint import TRAINER_STATE

    flag = "--resume_from_checkpoint"
    if not os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: no such folder")
    for name in (TRAINER_STATE, "args.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ArgumentError(f"{flag} {path}: no {name} there (not a complete swiftray checkpoint)")
        read_json_object(os.path.join(path, name), flag)
    try:
        train_state.read_meta(path)  # JSON only: refuses an earlier version's pickles without opening them
    except (OSError, ValueError) as err:
        raise ArgumentError(f"{flag}: {err}") from None
    for name in (train_state.TRAINABLE, train_state.OPTIMIZER, train_state.rng_file(0)):
        part = os.path.join(path, "train_state", name)
        if not os.path.isfile(part):
            raise ArgumentError(f"{flag}: {part}: missing; the checkpoint's training state is incomplete")
        check_safetensors_header(part, flag)


def check_same_model(path: str, args: Any) -> None:
    """The checkpoint was trained from a model like --model, with the same train type (and LoRA rank)."""
    flag = f"--resume_from_checkpoint {path}"
    full = os.path.join(path, "config.json")
    adapter = os.path.join(path, "adapter_config.json")
    if os.path.isfile(full):
        if args.train_type != "full":
            raise ArgumentError(f"{flag}: holds full weights (config.json) but --train_type is {args.train_type}; "
                                "resume with --train_type full")
        saved = read_json_object(full, flag)
        mine = read_json_object(os.path.join(args.model, "config.json"), "--model")
        for key in ARCHITECTURE_FIELDS:
            if saved.get(key) != mine.get(key):
                raise ArgumentError(f"{flag}: trained from another model: its config.json has {key} "
                                    f"{saved.get(key)!r}, --model {args.model} has {mine.get(key)!r}")
    elif os.path.isfile(adapter):
        if args.train_type == "full":
            raise ArgumentError(f"{flag}: holds a LoRA adapter (adapter_config.json) but --train_type is full; "
                                "resume with the run's --train_type and LoRA settings")
        rank = read_json_object(adapter, flag).get("r")
        if rank is not None and rank != args.lora_rank and not args.adapters:  # --adapters: its own rank wins
            raise ArgumentError(f"{flag}: its adapter has rank {rank} (adapter_config.json), --lora_rank is "
                                f"{args.lora_rank}; resume with the run's LoRA settings")


def check_inputs(args: Any) -> None:
    """Every model, adapter and checkpoint folder the flags name (args.model already filled)."""
    for flag in MODEL_FLAGS:
        path = getattr(args, flag, None)
        if path:
            check_model_folder(flag, path)
    for flag in ADAPTER_FLAGS:
        for path in getattr(args, flag, None) or []:
            check_adapter_folder(flag, path)
    if args.adapters and (args.train_type == "full" or len(args.adapters) > 1):
        raise ArgumentError(f"--adapters {' '.join(args.adapters)}: continuing training takes one LoRA folder and "
                            f"--train_type lora, dora or qlora (got --train_type {args.train_type})")
    if args.resume_from_checkpoint:
        check_same_model(args.resume_from_checkpoint, args)
