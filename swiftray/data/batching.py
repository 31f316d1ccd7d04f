"""From tokenised samples to each rank's micro-batches, one optimizer step at a time.

A "unit" is what one row of a micro-batch holds: one sample, or with
`--packing` one pack of samples. Each epoch shuffles the units with
`seed + epoch`, so the order is a pure function of (seed, epoch) and resuming
needs only (epoch, position). A step takes world_size x accumulation x
micro_batch units; the last step of an epoch is filled from the epoch's start,
as torch's DistributedSampler pads, so every rank always has full work. A dataset smaller
than one step trains in partial steps (empty micro-batch slots get a row without loss tokens).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from swiftray.data.packing import collate, pack_samples


class StepBatcher:
    def __init__(self, samples: list[dict[str, Any]], *, micro_batch_size: int, world_size: int,
                 accumulation: int, pad_token_id: int, seed: int = 42, shuffle: bool = True,
                 packing: bool = False, max_length: int | None = None, attn_impl: str | None = None):
        if not samples:
            raise ValueError("no training samples left after preprocessing (see the skipped-row counts above)")
        if packing and not max_length:
            raise ValueError("--packing needs --max_length (the length of each packed row)")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.accumulation = accumulation
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.shuffle = shuffle
        self.packing = packing
        self.max_length = max_length
        self.attn_impl = attn_impl
        self.epoch = 0
        self.position = 0  # units of the current epoch already consumed
        self._units = self._epoch_units(0)

    @property
    def units_per_step(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulation

    @property
    def num_units(self) -> int:
        """Rows per epoch: samples, or packs with --packing."""
        return len(self._units)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self._units) / self.units_per_step)

    def _epoch_units(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        if not self.packing:
            return [[i] for i in order]
        packs = pack_samples([self.samples[i] for i in order], self.max_length, seed=self.seed + epoch)
        return [[order[j] for j in pack] for pack in packs]

    def next_step(self) -> list[list[dict[str, torch.Tensor]]]:
        """Micro-batches for each rank: result[rank][k] is a collated batch."""
        return self._per_rank(self._take())

    def _take(self) -> list[list[int]]:
        """The next step's units (advancing the epoch position)."""
        need = self.units_per_step
        chosen = self._units[self.position:self.position + need]
        if len(chosen) < need and len(self._units) >= need:  # epoch tail: pad from the epoch's start
            chosen = chosen + self._units[: need - len(chosen)]
        # An epoch smaller than one step trains as one partial step (as ms-swift's last batch does):
        # micro-batch slots left empty get a filler row that has no loss tokens.
        self.position += need
        if self.position >= len(self._units):
            self.epoch += 1
            self.position = 0
            self._units = self._epoch_units(self.epoch)
        return chosen

    def _per_rank(self, chosen: list[list[int]]) -> list[list[dict[str, torch.Tensor]]]:
        per_rank: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(self.world_size)]
        b = self.micro_batch_size
        for k in range(self.accumulation):
            for rank in range(self.world_size):
                start = (k * self.world_size + rank) * b
                per_rank[rank].append(self._collate(chosen[start:start + b]))
        return per_rank

    def _collate(self, units: list[list[int]]) -> dict[str, torch.Tensor]:
        if not units:  # a slot of a partial step: every rank still runs the same number of micro-batches
            first = self.samples[0]
            return collate([{"input_ids": first["input_ids"], "labels": [-100] * len(first["input_ids"])}],
                           pad_token_id=self.pad_token_id, packing=False, attn_impl=self.attn_impl)
        if self.packing:
            return collate([[self.samples[i] for i in unit] for unit in units],
                           pad_token_id=self.pad_token_id, packing=True, attn_impl=self.attn_impl)
        return collate([self.samples[unit[0]] for unit in units], pad_token_id=self.pad_token_id,
                       packing=False, attn_impl=self.attn_impl)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._units = self._epoch_units(self.epoch)


def eval_batches(samples: list[dict[str, Any]], *, batch_size: int, world_size: int,
                 pad_token_id: int) -> list[list[dict[str, torch.Tensor]]]:
    """Every eval sample exactly once, split over ranks: result[rank] is a list of batches.

    Every rank gets the same number of batches, because sharded backends (FSDP2, ZeRO-3) run
    collectives in each forward: a rank with fewer samples gets filler batches whose labels are
    all -100, which add nothing to the loss, the accuracy or the token count.
    """
    shards = [samples[rank::world_size] for rank in range(world_size)]
    num_batches = max(math.ceil(len(shard) / batch_size) for shard in shards)
    filler = {"input_ids": samples[0]["input_ids"], "labels": [-100] * len(samples[0]["input_ids"])}
    per_rank: list[list[dict[str, torch.Tensor]]] = []
    for shard in shards:
        batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
        batches += [[filler]] * (num_batches - len(batches))
        per_rank.append([collate(batch, pad_token_id=pad_token_id, packing=False) for batch in batches])
    return per_rank


class GroupBatcher(StepBatcher):
    """Steps of samples that each become a group of rows sharing a prompt: a preference pair (chosen,
    rejected), a KTO example with its KL completion (`kinds.py`).

    A unit is one sample; `collate_fn(samples, pad_token_id)` lays a micro-batch's samples out as rows
    (adjacent, so that no group is ever split) and `step_counts(samples)` gives the step's global counts
    (pairs, chosen tokens ...) that every micro-batch carries, so that N ranks give one rank's loss.
    Per-row values stored on the samples (`ref_logps`, computed once over the dataset) are collated too.
    A dataset smaller than one step is cycled: a group never becomes a filler row.
    """

    def __init__(self, samples: list[dict[str, Any]], *, collate_fn: Any, step_counts: Any, **kwargs: Any):
        self.collate_fn, self.step_counts = collate_fn, step_counts
        super().__init__(samples, packing=False, **kwargs)

    def _take(self) -> list[list[int]]:
        need = self.units_per_step
        if len(self._units) >= need:
            return super()._take()
        chosen = (self._units * math.ceil(need / len(self._units)))[:need]
        self.epoch, self.position = self.epoch + 1, 0
        self._units = self._epoch_units(self.epoch)
        return chosen

    def _per_rank(self, chosen: list[list[int]]) -> list[list[dict[str, torch.Tensor]]]:
        per_rank = super()._per_rank(chosen)
        counts = {k: torch.tensor(v) for k, v in self.step_counts([self.samples[u[0]] for u in chosen]).items()}
        for micro in (m for rank in per_rank for m in rank):
            micro.update(counts)
        return per_rank

    def _collate(self, units: list[list[int]]) -> dict[str, torch.Tensor]:
        return collate_groups([self.samples[unit[0]] for unit in units], self.collate_fn, self.pad_token_id)


def collate_groups(samples: list[dict[str, Any]], collate_fn: Any, pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate_fn`'s rows plus `ref_logps` [rows] when every sample carries its rows' values."""
    batch = collate_fn(samples, pad_token_id)
    if all("ref_logps" in s for s in samples):
        batch["ref_logps"] = torch.tensor([v for s in samples for v in s["ref_logps"]], dtype=torch.float32)
    return batch


def group_eval_batches(samples: list[dict[str, Any]], *, batch_size: int, world_size: int, pad_token_id: int,
                       collate_fn: Any, step_counts: Any) -> list[list[dict[str, torch.Tensor]]]:
    """Every eval sample at least once, in full batches of `batch_size` samples on every rank: the list is
    filled up to a whole number of rounds from its start (as DistributedSampler pads), so that every
    micro-batch has its full size and averaging metrics over them gives the mean over samples."""
    per_round = batch_size * world_size
    total = math.ceil(len(samples) / per_round) * per_round
    padded = (samples * math.ceil(total / len(samples)))[:total]
    counts = {k: torch.tensor(v) for k, v in step_counts(padded).items()}
    per_rank: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(world_size)]
    for k in range(total // per_round):
        for rank in range(world_size):
            start = (k * world_size + rank) * batch_size
            batch = collate_groups(padded[start:start + batch_size], collate_fn, pad_token_id)
            per_rank[rank].append({**batch, **counts})
    return per_rank
