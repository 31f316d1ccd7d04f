"""Reward models: a causal LM with a one-output score head (transformers' ``*ForSequenceClassification``).

``load_reward_model`` reads a causal-LM folder (the head starts fresh, seeded) or a saved reward model
(the head is read back). ``reward_scores`` is transformers' own forward: the score of a row is the head
applied to its last token that is not padding (the rightmost token whose id is not ``pad_token_id``), so a
model saved by ``save_reward_model`` and loaded back with ``AutoModelForSequenceClassification`` gives
the same scores. The pad token must then differ from the tokens a sequence ends with (the eos): a
tokenizer whose pad is its eos would score the token before it, in training and at use alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from swiftray.models.loader import ATTN_IMPLS, peft_to_base_state_dict, resolve_dtype


def load_reward_model(model_dir: str, *, torch_dtype: str = "float32", attn_impl: str | None = None,
                      pad_token_id: int | None = None, seed: int = 42) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` with ``num_labels=1`` from ``model_dir``, on CPU.

    ``pad_token_id`` defaults to the config's, else the folder's tokenizer's (its pad, else its eos);
    the score head needs it to find each row's last token. ``seed`` fixes a fresh head's init, so
    every rank of a group builds the same weights. A LoRA reward model (an adapter folder whose score
    head PEFT saved in full, as `--rlhf_type rm --train_type lora` writes it) is loaded on its base
    model and merged.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist (no model hub is used)")
    adapter_config = os.path.join(model_dir, "adapter_config.json")
    if os.path.isfile(adapter_config):
        from peft import PeftModel

        with open(adapter_config, encoding="utf-8") as f:
            base_dir = json.load(f).get("base_model_name_or_path")
        if not base_dir or not os.path.isdir(base_dir):
            raise FileNotFoundError(f"{adapter_config}: its base model {base_dir!r} is not a local folder")
        base = load_reward_model(base_dir, torch_dtype=torch_dtype, attn_impl=attn_impl, pad_token_id=pad_token_id,
                                 seed=seed)
        return PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    config = AutoConfig.from_pretrained(model_dir, num_labels=1)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError(f"{model_dir}: no pad token id in the config or the tokenizer; pass pad_token_id")
    config.pad_token_id = pad_token_id
    config.use_cache = False
    kwargs: dict[str, Any] = {"config": config, "dtype": resolve_dtype(torch_dtype, model_dir)}
    if attn_impl is not None:
        kwargs["attn_implementation"] = ATTN_IMPLS[attn_impl]
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)


def reward_scores(model: torch.nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One score per row ``[B]`` (float32): the head at the row's last non-pad token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def save_reward_model(model: torch.nn.Module, output_dir: str, tokenizer: Any = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``model`` as a folder ``AutoModelForSequenceClassification.from_pretrained`` loads (safetensors,
    config with the ``*ForSequenceClassification`` architecture, ``num_labels=1`` and the pad id).

    A PEFT-wrapped model is saved with its adapters merged (its score head must be in
    ``modules_to_save`` to have been trained). ``state_dict``: weights gathered elsewhere (FSDP, ZeRO-3),
    named as ``model.state_dict()`` names them.
    """
    from peft import PeftModel

    os.makedirs(output_dir, exist_ok=True)
    if isinstance(model, PeftModel):
        state_dict = peft_to_base_state_dict(model, state_dict if state_dict is not None else model.state_dict())
        model = model.get_base_model()
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir
