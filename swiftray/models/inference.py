"""Load a model for generation or export: a base folder plus optional LoRA adapters."""

from __future__ import annotations

import os
from typing import Any

import torch


def resolve_dtype(name: str | None) -> torch.dtype | str:
    """A dtype name (ms-swift's short ones too) -> torch; unset: float32 on CPU, the checkpoint's on GPU."""
    from swiftray.models.loader import DTYPES

    if name in (None, "auto"):
        return torch.float32 if not torch.cuda.is_available() else "auto"
    if name not in DTYPES:
        raise ValueError(f"--torch_dtype {name!r}: expected one of {', '.join(DTYPES)} or auto")
    return DTYPES[name]


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_inference_model(model_dir: str, adapters: list[str] | None = None, *, torch_dtype: str | None = None,
                         merge: bool = False, device: str | None = None,
                         attn_impl: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode. A full-weights checkpoint passed as an adapter is loaded as the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiftray.models.loader import ATTN_IMPLS

    adapters = list(adapters or [])
    if adapters and not is_adapter_dir(adapters[0]) and os.path.isfile(os.path.join(adapters[0], "config.json")):
        model_dir, adapters = adapters[0], adapters[1:]
    for path in adapters:
        if not is_adapter_dir(path):
            raise ValueError(f"--adapters {path}: no adapter_config.json there (not a LoRA checkpoint)")
    kwargs = {"attn_implementation": ATTN_IMPLS[attn_impl]} if attn_impl else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(torch_dtype), **kwargs)
    tokenizer_dir = adapters[0] if adapters and os.path.isfile(os.path.join(adapters[0], "tokenizer_config.json")) \
        else model_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if adapters:
        from peft import PeftModel

        from swiftray.preflight import check_lora_fits

        for path in adapters:
            check_lora_fits("adapters", path, model, model_dir)
        model = PeftModel.from_pretrained(model, adapters[0])
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(path, adapter_name=f"adapter_{i}")
        if merge:
            model = model.merge_and_unload()
    if device:
        model.to(device)
    elif torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return model, tokenizer
