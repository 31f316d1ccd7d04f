"""Value models for PPO's critic: a transformer with a one-output head on every position.

`load_value_model` builds transformers' `*ForTokenClassification` with `num_labels=1` from a folder:

- a causal LM (the policy's checkpoint): the backbone's weights, and a fresh head (seeded, so every
  rank builds the same one);
- a reward model saved as `*ForSequenceClassification` (ms-swift starts its value model from the
  reward model, as TRL does): its head is named `score` too, so it is read back;
- a critic saved by swiftray (`checkpoint-N/critic/`): everything is read back.

The forward then gives `logits` [B, T, 1]: the value of the state after reading each position's token,
which is what the training backends (DDP, FSDP2, DeepSpeed) already run and shard. Dropout is off
(the head's included), as TRL turns it off for every PPO model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from swiftray.models.loader import ATTN_IMPLS, TRAIN_TYPES, _wrap_peft, resolve_dtype


def load_value_model(model_dir: str, *, torch_dtype: str = "float32", attn_impl: str | None = None,
                     gradient_checkpointing: bool = False, train_type: str = "full", lora_rank: int = 8,
                     lora_alpha: int = 32, lora_dropout: float = 0.05,
                     target_modules: Sequence[str] = ("all-linear",), seed: int = 42) -> torch.nn.Module:
    """`AutoModelForTokenClassification` with one output per position from `model_dir`, on CPU, ready to
    train. LoRA/DoRA train adapters plus the whole head (PEFT's token-classification task keeps `score`
    trainable)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"value model directory {model_dir!r} does not exist (no model hub is used)")
    if train_type not in TRAIN_TYPES or train_type == "qlora":
        raise ValueError(f"value model: train_type={train_type!r}; the critic trains full, lora or dora")
    config = AutoConfig.from_pretrained(model_dir, num_labels=1)
    config.classifier_dropout = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    config.use_cache = False
    kwargs: dict[str, Any] = {"config": config, "dtype": resolve_dtype(torch_dtype, model_dir)}
    if attn_impl is not None:
        kwargs["attn_implementation"] = ATTN_IMPLS[attn_impl]
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train_type == "full":
        return model
    targets = list(target_modules)
    if targets == ["all-linear"]:  # PEFT's shortcut would wrap the head too, which the task keeps whole
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and not name.startswith("score")})
    return _wrap_peft(model, train_type, [], lora_rank, lora_alpha, lora_dropout, targets, [],
                      gradient_checkpointing, seed, task_type="TOKEN_CLS")
