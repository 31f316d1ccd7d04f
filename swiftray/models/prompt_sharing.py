"""Score the n completions of one prompt with the prompt computed once (GRPO's groups).

GRPO scores num_generations completions of every prompt, both in the policy's forward/backward
and in the reference forward. Right-padded rows compute each prompt n times:

    row 0: [prompt][completion 0][pad ...]
    row 1: [prompt][completion 1][pad ...]

Here rows that share a prompt become one sequence, the prompt once and then every completion:

    [prompt][completion 0][completion 1] ...

with a 4D attention mask in which a completion sees the prompt and its own earlier tokens only,
and position ids that restart each completion right after the prompt. Every token then has the
hidden state it has in its own row, so the logits are the same (to float rounding), and so are
the gradients: the shared prompt's gradient is the sum of what each row would have sent it.
`unpack_index` lays the packed logits back out as the [B, W] rows, so everything downstream (the
loss, its masks, per-token values) is unchanged.

Tokens saved: (n - 1) x prompt length per group. Attention grows (one long row instead of n
short ones), so `shared_forward` packs only when a FLOP estimate says the packed forward is
cheaper (SWIFTRAY_SHARE_PROMPTS=0 turns it off). The mask is a dense [L, L] tensor, which sdpa
and eager attention take but flash attention does not; models on flash attention keep the padded
rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from swiftray.data.packing import allowed_to_float

MAX_PACKED_TOKENS = 8192  # the bool mask is L^2 bytes: 64 MiB here
MIN_SAVING = 0.9  # pack only when the packed forward costs under 90% of the padded one


@dataclass
class SharedPrompts:
    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    attention_mask: torch.Tensor  # [1, 1, L, L], True where a query may attend a key
    unpack_index: torch.Tensor  # [B, W]: position in L of row b's token t (0 on padding)


def pack_shared_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_lens: list[int]) -> SharedPrompts | None:
    """Rows with identical prompt tokens share one copy of them; None if no prompt repeats.

    Rows are right-padded (attention_mask [B, W] of 1s then 0s); row b's first prompt_lens[b]
    tokens are its prompt.
    """
    rows = input_ids.tolist()
    lengths = attention_mask.sum(-1).tolist()
    prompts: dict[tuple[int, ...], tuple[int, int]] = {}  # prompt tokens -> (start in packed, group id)
    tokens: list[int] = []
    positions: list[int] = []
    groups: list[int] = []
    branches: list[int] = []  # -1 on prompt tokens, else the row the completion token belongs to
    index = torch.zeros(input_ids.shape, dtype=torch.long)
    for b, (row, plen, length) in enumerate(zip(rows, prompt_lens, lengths)):
        key = tuple(row[:plen])
        if key not in prompts:
            prompts[key] = (len(tokens), len(prompts))
            tokens += key
            positions += range(plen)
            groups += [len(prompts) - 1] * plen
            branches += [-1] * plen
        start, group = prompts[key]
        index[b, :plen] = torch.arange(start, start + plen)
        index[b, plen:length] = torch.arange(len(tokens), len(tokens) + length - plen)
        tokens += row[plen:length]
        positions += range(plen, length)
        groups += [group] * (length - plen)
        branches += [b] * (length - plen)
    if len(prompts) == len(rows):
        return None
    group = torch.tensor(groups)
    branch = torch.tensor(branches)
    width = len(tokens)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same_group = group[:, None] == group[None, :]
    visible = (branch[None, :] == -1) | (branch[:, None] == branch[None, :])  # the prompt, or my own branch
    allowed = (causal & same_group & visible)[None, None]
    return SharedPrompts(torch.tensor([tokens]), torch.tensor([positions]), allowed, index)


def forward_cost(num_rows: int, width: int, linear_flops: float, attention_flops: float) -> float:
    """FLOPs of a forward over num_rows rows of `width` tokens (dense attention, as sdpa with a mask runs)."""
    return num_rows * (width * linear_flops + width * width * attention_flops)


def model_flops(config: Any, num_params: int) -> tuple[float, float]:
    """(FLOPs per token in the weight matmuls, FLOPs per query-key pair in attention) of a forward."""
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads
    layers = getattr(config, "num_hidden_layers", 1)
    return 2.0 * num_params, 4.0 * heads * head_dim * layers


def shared_forward(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch: dict[str, torch.Tensor],
                   model: Any, num_params: int) -> torch.Tensor | None:
    """Logits [B, W, V] of the padded rows in `batch`, computed with shared prompts; None when that
    would not pay (or cannot: no `prompt_lens`, flash attention, too long), and the caller runs
    the padded rows itself."""
    config = getattr(model, "config", None)
    if os.environ.get("SWIFTRAY_SHARE_PROMPTS", "1") == "0":
        return None
    if "prompt_lens" not in batch or batch.get("attention_mask") is None or batch["attention_mask"].dim() != 2:
        return None
    attn = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if attn not in ("sdpa", "eager"):
        return None
    input_ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
    prompt_lens = batch["prompt_lens"].tolist()
    # Decide from the packed length before building anything (the mask alone is L^2).
    prompts = {tuple(row[:plen]) for row, plen in zip(input_ids.tolist(), prompt_lens)}
    width = sum(len(p) for p in prompts) + int(mask.sum()) - sum(prompt_lens)
    linear, attention = model_flops(config, num_params)
    padded = forward_cost(input_ids.shape[0], input_ids.shape[1], linear, attention)
    if (len(prompts) == len(prompt_lens) or width > MAX_PACKED_TOKENS
            or forward_cost(1, width, linear, attention) > MIN_SAVING * padded):
        return None
    packed = pack_shared_prompts(input_ids, mask, prompt_lens)
    device = batch["input_ids"].device
    attention_mask = packed.attention_mask if attn == "sdpa" else allowed_to_float(packed.attention_mask)
    logits = forward({"input_ids": packed.input_ids.to(device), "position_ids": packed.position_ids.to(device),
                      "attention_mask": attention_mask.to(device)})
    return logits[0][packed.unpack_index.to(device)]
