"""Logits only where a loss is taken: the output head runs on the label positions alone.

A causal LM's head turns every position's hidden state into vocabulary logits, and the loss then
upcasts them to float32 for log-softmax. Only positions whose next token is a label matter: in SFT on
chat data that is the assistant turn, a fraction of each row. `logits_at(model, mask)` installs a
forward pre-hook on the output head for one forward: the head receives hidden[:, :-1][mask] ([N, H])
and the model returns logits [N, V], one row per loss token (as `token_logprobs` takes them). The
rest of the model runs unchanged; sharded backends (FSDP2, ZeRO-3) gather the head's weights in
their own hooks, which run before this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def output_head(model: Any) -> torch.nn.Module | None:
    """The module that maps hidden states to vocabulary logits (PEFT models: the base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_output_embeddings", None)
    return getter() if getter is not None else None


@contextlib.contextmanager
def logits_at(model: Any, mask: torch.Tensor) -> Iterator[bool]:
    """For the forwards inside: logits only at positions t with mask[b, t] (mask [B, T-1]: the logits
    of position t score token t+1). Yields False, and changes nothing, for a model without a head."""
    head = output_head(model)
    if head is None:
        yield False
        return

    def select(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][:, :-1][mask], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield True
    finally:
        handle.remove()
