"""What flows between the RL roles: rollouts, their scores, and the training batch built from them.

Everything here runs inside actors or Ray tasks; the driver sees only ObjectRefs
and small metric dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RolloutBatch:
    """Completions for a set of prompts, num_generations per prompt, adjacent."""

    prompt_ids: list[list[int]]  # one entry per completion (the prompt repeated per generation)
    completion_ids: list[list[int]]
    completions: list[str]  # decoded completion text
    truncated: list[bool]  # hit max_completion_length without a stop token
    group: list[int]  # which prompt (within the step) each completion answers
    columns: dict[str, list[Any]]  # dataset columns aligned with completions (solution, messages, ...)
    version: int  # policy weight version that generated this batch
    rewards: list[float] = field(default_factory=list)
    reward_per_func: dict[str, list[float | None]] = field(default_factory=dict)
    ref_logprobs: list[list[float]] | None = None  # per completion token, from the reference model
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (generate_s, score_s, ...)
    # What annotate-phase roles wrote, one entry per completion, by name: the policy's token log-probs
    # ("logprobs"), a critic's values ("values"), a teacher's log-probs ("teacher_logprobs"), ...
    annotations: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """One batch from several rollout workers' outputs (groups renumbered to stay distinct)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no rollouts to concatenate")
    out = RolloutBatch([], [], [], [], [], {k: [] for k in parts[0].columns}, min(p.version for p in parts))
    offset = 0
    for p in parts:
        out.prompt_ids += p.prompt_ids
        out.completion_ids += p.completion_ids
        out.completions += p.completions
        out.truncated += p.truncated
        out.group += [g + offset for g in p.group]
        offset = max(out.group) + 1
        for k in out.columns:
            out.columns[k] += p.columns.get(k, [None] * len(p))
        out.rewards += p.rewards
        for k, v in p.reward_per_func.items():
            out.reward_per_func.setdefault(k, []).extend(v)
        if p.ref_logprobs is not None:
            out.ref_logprobs = (out.ref_logprobs or []) + p.ref_logprobs
        for k, v in p.timings.items():  # workers run side by side: the slowest one is the stage's time
            out.timings[k] = max(out.timings.get(k, 0.0), v)
        for k, v in p.annotations.items():
            out.annotations.setdefault(k, []).extend(v)
    return out


def select(batch: RolloutBatch, keep: list[int]) -> RolloutBatch:
    """The completions at indices `keep`, in that order."""
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return RolloutBatch(
        pick(batch.prompt_ids), pick(batch.completion_ids), pick(batch.completions), pick(batch.truncated),
        pick(batch.group), {k: pick(v) for k, v in batch.columns.items()}, batch.version,
        pick(batch.rewards) if batch.rewards else [],
        {k: pick(v) for k, v in batch.reward_per_func.items()},
        pick(batch.ref_logprobs) if batch.ref_logprobs is not None else None,
        dict(batch.timings),
        {k: pick(v) for k, v in batch.annotations.items()},
    )


def rank_slices(batch: RolloutBatch, world_size: int) -> list[RolloutBatch]:
    """Equal, contiguous slices of the completions, one per rank (what a collective annotate takes)."""
    if len(batch) % world_size:
        raise ValueError(f"{len(batch)} completions do not split evenly over {world_size} ranks")
    per_rank = len(batch) // world_size
    return [select(batch, list(range(r * per_rank, (r + 1) * per_rank))) for r in range(world_size)]


def rejoin_slices(whole: RolloutBatch, slices: list[RolloutBatch]) -> RolloutBatch:
    """The annotated rank slices of `whole` as one batch again, with `whole`'s groups and version."""
    out = concat_rollouts(slices)
    out.group, out.version = list(whole.group), whole.version
    return out


def completion_frame(values: list[list[float]], width: int | None = None) -> torch.Tensor:
    """Per-completion lists as a right-padded float32 tensor [B, width] (width: the longest list)."""
    width = max((len(v) for v in values), default=0) if width is None else width
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        v = v[:width]
        out[i, :len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out


def completion_to_sequence(frame: torch.Tensor, prompt_lens: list[int], counts: list[int], width: int) -> torch.Tensor:
    """Completion-frame values [B, T] in a prompt+completion layout [B, width]: frame[b, t] for t < counts[b]
    goes to column prompt_lens[b] - 1 + t. With width W - 1 that is token_logprobs' layout (column c scores
    token c + 1); with width W it is the per-position layout, where column plen + L - 1 (the last token's
    position: the state after it) exists for every row."""
    out = frame.new_zeros((frame.shape[0], width, *frame.shape[2:]))
    for i, (plen, n) in enumerate(zip(prompt_lens, counts)):
        out[i, plen - 1:plen - 1 + n] = frame[i, :n]
    return out


def sequences_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                    loss_on: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows; labels are the completion tokens (-100 elsewhere);
    `prompt_lens` [B] lets the forward compute a prompt shared by several rows once
    (models/prompt_sharing.py).

    `loss_on[i] = False` masks a whole completion (e.g. an overlong one) out of the loss.
    """
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, :len(p) + len(c)] = 1
        if loss_on is None or loss_on[i]:
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "prompt_lens": torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)}


def completion_logprobs_to_tokens(values: list[list[float]], prompt_lens: list[int], width: int) -> torch.Tensor:
    """Per-completion-token values laid out like `token_logprobs` ([B, width-1], shifted by one)."""
    out = torch.zeros((len(values), width - 1), dtype=torch.float32)
    for i, (v, plen) in enumerate(zip(values, prompt_lens)):
        # token_logprobs[t] scores token t+1, so completion token 0 (at position plen) sits at plen-1.
        out[i, plen - 1:plen - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def tokens_to_completion_values(token_values: torch.Tensor, prompt_lens: list[int],
                                completion_lens: list[int]) -> list[list[float]]:
    """The inverse of `completion_logprobs_to_tokens`: per-completion lists."""
    return [token_values[i, plen - 1:plen - 1 + clen].tolist()
            for i, (plen, clen) in enumerate(zip(prompt_lens, completion_lens))]


def split_for_ranks(rows: dict[str, torch.Tensor], world_size: int,
                    micro_batch_size: int) -> list[list[dict[str, torch.Tensor]]]:
    """Cut the step's rows into result[rank][k] micro-batches, each trimmed to its longest row.

    Every micro-batch carries the step's global counts, so that the loss of N
    workers equals the loss of one worker on the whole batch. A 2-D (or wider) tensor as wide as
    `input_ids` is per position and keeps the micro-batch's width; any other is per token, laid
    out like token_logprobs, and keeps one column less.
    """
    n, full_width = rows["input_ids"].shape
    per_rank = n // world_size
    if per_rank * world_size != n or per_rank % micro_batch_size:
        raise ValueError(f"{n} sequences do not split into {world_size} ranks x micro-batches of {micro_batch_size}")
    num_micro = per_rank // micro_batch_size
    shards: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(world_size)]
    for rank in range(world_size):
        for k in range(num_micro):
            start = rank * per_rank + k * micro_batch_size
            idx = slice(start, start + micro_batch_size)
            width = int(rows["attention_mask"][idx].sum(-1).max())
            micro = {}
            for key, value in rows.items():
                if value.dim() == 1:
                    micro[key] = value[idx]
                elif value.shape[1] == full_width:  # per position: input_ids, labels, a critic's values ...
                    micro[key] = value[idx, :width]
                else:  # per-token values laid out like token_logprobs: one shorter
                    micro[key] = value[idx, :width - 1]
            micro["num_sequences_global"] = torch.tensor(n)
            micro["num_micro_batches_global"] = torch.tensor(world_size * num_micro)
            shards[rank].append(micro)
    return shards
