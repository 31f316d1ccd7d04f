"""Group encoded samples into packs, and turn samples or packs into model batches.

Packing puts several samples into one row so that no compute is spent on
padding. The samples of a pack must not see each other:

- sdpa / eager: a 4D block-diagonal causal mask [B, 1, T, T]. transformers
  uses a 4D mask as given (`masking_utils._preprocess_mask_arguments` returns
  early), so it replaces the model's own causal mask. sdpa takes it as bool
  (True = may attend); eager adds it to the scores, so it gets 0 / -inf-like floats.
- flash attention: no mask at all; all packs are laid end to end in one row
  and `position_ids` restart at 0 for each sample. transformers' flash path
  finds the sample boundaries from the position ids (varlen kernel), and only
  does so for a batch of one row.

Labels are shifted inside the model (logits at t predict labels[t + 1]), so
the first token of every sample gets IGNORE_INDEX: the last token of one
sample is never trained to predict the start of the next.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
SDPA_LIKE = ("sdpa", "eager")

Sample = dict[str, list[int]]


def pack_samples(samples: Sequence[Sample], max_length: int, seed: int | None = None) -> list[list[int]]:
    """Group sample indices into packs of at most max_length tokens (first-fit decreasing).

    Longest samples are placed first, each into the first pack with room. The packs come out in the
    order they were opened, or shuffled with `seed`.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sample(s) longer than max_length={max_length} (first: index {too_long[0]}, "
            f"{lengths[too_long[0]]} tokens); truncate or drop them in the template first"
        )
    # A max-tree over the free space of the packs, so that "first pack with room" costs O(log n).
    # Leaf j is pack j; a pack not yet opened has max_length free, so the first fit is always an
    # open pack or the next new one.
    size = 1
    while size < max(len(samples), 1):
        size *= 2
    free = [max_length] * (2 * size)
    packs: list[list[int]] = []
    for i in sorted(range(len(samples)), key=lambda i: (-lengths[i], i)):
        node = 1
        while node < size:  # walk down, preferring the left child when it has room
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        pack = node - size
        if pack == len(packs):
            packs.append([])
        packs[pack].append(i)
        free[node] -= lengths[i]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    if seed is not None:
        random.Random(seed).shuffle(packs)
    return packs


def collate(
    samples: Sequence[Sample] | Sequence[Sequence[Sample]],
    *,
    pad_token_id: int,
    packing: bool,
    attn_impl: str | None = "sdpa",
) -> dict[str, torch.Tensor]:
    """Make a batch of tensors. attn_impl=None means transformers' default, sdpa.

    packing=False: `samples` is a list of samples; rows are right-padded and get a 2D attention_mask.
    packing=True: `samples` is a list of packs (each a list of samples); see the module docstring.
    """
    if not samples:
        raise ValueError("collate got an empty batch")
    if not packing:
        return _collate_padded(samples, pad_token_id)
    attn_impl = attn_impl or "sdpa"
    packs = [list(p) for p in samples]
    if any(not p or not isinstance(p[0], dict) for p in packs):
        raise ValueError(
            "with packing=True, collate expects a list of packs, each a non-empty list of samples"
        )
    if attn_impl.startswith("flash"):
        # One row of everything: the flash varlen path only detects packed sequences when batch size is 1.
        return _collate_packed([[s for p in packs for s in p]], pad_token_id, mask=None)
    if attn_impl not in SDPA_LIKE:
        raise ValueError(f"attn_impl={attn_impl!r}: packing supports {SDPA_LIKE} and flash attention")
    return _collate_packed(packs, pad_token_id, mask=attn_impl)


def _collate_padded(samples: Sequence[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = torch.tensor(s["input_ids"])
        labels[row, :n] = torch.tensor(s["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _collate_packed(
    packs: list[list[Sample]], pad_token_id: int, mask: str | None
) -> dict[str, torch.Tensor]:
    width = max(sum(len(s["input_ids"]) for s in p) for p in packs)
    input_ids = torch.full((len(packs), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    # segment[b, t]: which sample of row b token t belongs to; the padding tail is a segment of its own so
    # that pad tokens attend to themselves (a query row with nothing to attend to would give NaN in sdpa).
    segment = torch.zeros((len(packs), width), dtype=torch.long)
    for row, pack in enumerate(packs):
        at = 0
        for k, s in enumerate(pack):
            n = len(s["input_ids"])
            input_ids[row, at : at + n] = torch.tensor(s["input_ids"])
            labels[row, at : at + n] = torch.tensor(s["labels"])
            labels[row, at] = IGNORE_INDEX
            position_ids[row, at : at + n] = torch.arange(n)
            segment[row, at : at + n] = k
            at += n
        position_ids[row, at:] = torch.arange(width - at)
        segment[row, at:] = len(pack)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if mask is not None:
        batch["attention_mask"] = block_causal_mask(segment, as_float=mask == "eager")
    return batch


def block_causal_mask(segment: torch.Tensor, *, as_float: bool = False) -> torch.Tensor:
    """[B, 1, T, T] mask: query t may attend key s iff s <= t and both lie in the same segment.

    bool (True = attend) for sdpa; as_float gives the additive form for eager (0 or the float32 minimum).
    """
    width = segment.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    allowed = (same & causal)[:, None]
    return allowed_to_float(allowed) if as_float else allowed


def allowed_to_float(allowed: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = attend) in eager attention's additive form: 0 or the float32 minimum."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
