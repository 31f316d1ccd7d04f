"""From swiftray's micro-batches to GPTModel inputs, and from vocab-parallel logits to token log-probs.

Micro-batches come as PolicyActor takes them: `input_ids` [B, T] with `labels`, and either a 2D
`attention_mask` (right padding), or packed rows with `position_ids` (restarting at 0 for each
sample) and possibly a 4D block-causal mask. megatron-core's local attention takes any
[B, 1, T, T] boolean mask (True = blocked), so every form becomes one: causal, within a
sample, and never onto padding.

With tensor parallelism the output layer gives each rank a slice of the vocabulary; log-probs,
entropies and the argmax are reduced over the TP group, so they equal the unsplit ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def model_inputs(batch: dict[str, Any], pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, position_ids [3, B, S] (mrope axes, see model.py) and the blocked-attention mask.

    pad_to_multiple: sequence parallelism splits the sequence over TP ranks, so S is padded up to a
    multiple of it (padding is masked and carries no label; callers trim outputs back to T).
    """
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(width).expand(rows, width)
    if mask is not None and mask.dim() == 4:
        allowed = mask[:, :1].bool() if mask.dtype == torch.bool else mask[:, :1] == 0
    else:
        segment = (positions == 0).long().cumsum(-1)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = (causal & (segment[:, :, None] == segment[:, None, :]))[:, None]
        if mask is not None:  # 2D: 1 on real tokens, 0 on padding; a query never attends padding keys
            allowed = allowed & mask.bool()[:, None, None, :]
    extra = (-width) % pad_to_multiple
    if extra:
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=0)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, extra + 1)], dim=1)
        allowed = torch.nn.functional.pad(allowed, (0, extra, 0, extra), value=False)
        allowed[..., width:, width:] |= torch.eye(extra, dtype=torch.bool)  # padding attends to itself
    return {"input_ids": input_ids, "position_ids": positions[None].expand(3, -1, -1).contiguous(),
            "attention_mask": ~allowed}


def loss_labels(batch: dict[str, Any]) -> torch.Tensor:
    """`labels`, or (without them) every next token except padding, as PolicyActor scores."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            labels = labels.masked_fill(mask == 0, -100)
    if labels.shape != batch["input_ids"].shape:
        raise ValueError(f"MegatronPolicyActor: labels shape {tuple(labels.shape)} != input_ids shape "
                         f"{tuple(batch['input_ids'].shape)}")
    return labels


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, tp_group: dist.ProcessGroup,
                   fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(labels[:, t+1] | <= t) as float32 [B, T-1] (zero off the mask), the mask, #argmax hits.

    logits: [B, T', V/TP] from the output layer (T' >= T: sequence padding is dropped here).
    Only the loss positions go through the vocab-parallel log-softmax.
    """
    from megatron.core import tensor_parallel

    width = labels.shape[1]
    targets = labels[:, 1:]
    mask = targets != -100
    selected = logits[:, : width - 1][mask]  # [N, V/TP]
    wanted = targets[mask]
    if fused:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        nll = fused_vocab_parallel_cross_entropy(selected[:, None], wanted[:, None], tp_group)[:, 0]
    else:
        nll = tensor_parallel.vocab_parallel_cross_entropy(selected, wanted, tp_group=tp_group)
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    logprobs = logprobs.masked_scatter(mask, -nll.float())
    with torch.no_grad():
        correct = (vocab_parallel_argmax(selected, tp_group) == wanted).sum()
    return logprobs, mask, correct


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """Argmax over the whole vocabulary of [N, V/TP] slices (ties go to the lowest id)."""
    size = dist.get_world_size(tp_group)
    value, index = logits.float().max(dim=-1)
    if size == 1:
        return index
    index = index + dist.get_rank(tp_group) * logits.shape[-1]
    values = [torch.empty_like(value) for _ in range(size)]
    indices = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(values, value, group=tp_group)
    dist.all_gather(indices, index, group=tp_group)
    best = torch.stack(values).argmax(dim=0)  # first maximum: the lowest vocabulary slice
    return torch.stack(indices).gather(0, best[None])[0]


@torch.no_grad()
def token_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group: dist.ProcessGroup,
                  chunk: int = 1024) -> torch.Tensor:
    """Entropy of each next-token distribution at the loss positions, laid out like token_logprobs."""
    width = labels.shape[1]
    mask = labels[:, 1:] != -100
    selected = logits[:, : width - 1][mask]
    parts = []
    for rows in selected.split(chunk):
        rows = rows.float()
        top = rows.max(dim=-1, keepdim=True).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
        shifted = rows - top
        sums = torch.stack([shifted.exp().sum(-1), (shifted.exp() * shifted).sum(-1)])
        dist.all_reduce(sums, group=tp_group)
        # H = log Z - E[x - top] with Z = sum exp(x - top)
        parts.append(sums[0].log() - sums[1] / sums[0])
    values = torch.cat(parts) if parts else torch.zeros(0, device=logits.device)
    return torch.zeros(mask.shape, dtype=torch.float32, device=logits.device).masked_scatter(mask, values)
