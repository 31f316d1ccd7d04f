"""The folders and files the flags name, checked on the driver before anything starts.

The run plan (plan.py) checks values; this checks that what they point at is there and readable,
so that a wrong path fails in a second with one line naming the flag and the file, rather than
inside an actor after Ray has started:

- model folders (--model, --ref_model, --teacher_model, --value_model): a config.json that parses,
  weights whose safetensors headers parse (a truncated or garbage file is named);
- adapter folders (--adapters, --ref_adapters): an adapter_config.json, and LoRA matrices whose shapes fit
  the base model's modules of the same name (a LoRA trained on another base is named here, not in an actor);
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


def lora_mismatch(path: str, model: Any) -> str | None:
    """Why the LoRA weights in folder `path` do not fit `model` (a base model, real or on the meta device):
    a lora_A/lora_B matrix whose shape differs from its module's, or no module of the adapter in the model.
    None when they fit, or when there is nothing to compare (no safetensors weights). Only the safetensors
    header is read."""
    from safetensors import safe_open

    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return None
    modules = dict(model.named_modules())
    lora = found = 0
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            # PEFT's names: base_model.model.<module path>.lora_A.weight (lora_B: the output side)
            head, _, tail = key.removeprefix("base_model.model.").rpartition(".lora_")
            if tail not in ("A.weight", "B.weight"):
                continue
            lora += 1
            module = modules.get(head)
            if module is None or not hasattr(module, "in_features"):
                continue
            found += 1
            shape = tuple(f.get_slice(key).get_shape())
            side, want, got = (("input", module.in_features, shape[1]) if tail == "A.weight"
                               else ("output", module.out_features, shape[0]))
            if got != want:
                return f"{key} has {side} size {got}, the base model's {head} has {want}"
    if lora and not found:
        return f"none of its {lora} LoRA matrices belongs to a module of the base model"
    return None


def check_adapter_fits(flag: str, path: str, model_dir: str) -> None:
    """The adapter's LoRA matrices fit the base model `model_dir` (built on the meta device: no weights
    are read). A base that transformers cannot build from its config alone is not checked here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, ImportError):
        return  # e.g. a model type this transformers does not know: the actor's load names it
    check_lora_fits(flag, path, model, model_dir)


def check_lora_fits(flag: str, path: str, model: Any, model_dir: str) -> None:
    """`lora_mismatch` as the error a user reads."""
    problem = lora_mismatch(path, model)
    if problem:
        raise ArgumentError(f"--{flag} {path}: does not fit {model_dir}: {problem} (adapter_model.safetensors); "
                            "was it trained on another model?")


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
        base = (getattr(args, "ref_model", None) or args.model) if flag == "ref_adapters" else args.model
        for path in getattr(args, flag, None) or []:
            check_adapter_folder(flag, path)
            if base:
                check_adapter_fits(flag, path, base)
    if args.adapters and (args.train_type == "full" or len(args.adapters) > 1):
        raise ArgumentError(f"--adapters {' '.join(args.adapters)}: continuing training takes one LoRA folder and "
                            f"--train_type lora, dora or qlora (got --train_type {args.train_type})")
    if args.resume_from_checkpoint:
        check_same_model(args.resume_from_checkpoint, args)
