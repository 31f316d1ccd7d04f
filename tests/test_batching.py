"""StepBatcher: each optimizer step's micro-batches per rank, including a dataset smaller than one step."""

from __future__ import annotations

import pytest

from swiftray.data.batching import StepBatcher


def samples(n: int) -> list[dict]:
    return [{"input_ids": [1, 2, 3 + i, 4], "labels": [-100, -100, 3 + i, 4]} for i in range(n)]


def loss_tokens(micro: dict) -> int:
    return int((micro["labels"][:, 1:] != -100).sum())


def test_a_dataset_smaller_than_one_step_trains_as_a_partial_step():
    """3 samples, 2 ranks x 4 accumulation x 2 per micro-batch = 16 per step: one step holds the 3 samples
    once each; the empty micro-batch slots carry no loss tokens (ms-swift trains a partial last batch)."""
    batcher = StepBatcher(samples(3), micro_batch_size=2, world_size=2, accumulation=4, pad_token_id=0, seed=0)
    assert batcher.steps_per_epoch == 1
    step = batcher.next_step()
    assert len(step) == 2 and all(len(rank) == 4 for rank in step)  # every rank the same number of micro-batches
    assert sum(loss_tokens(m) for rank in step for m in rank) == 3 * 2
    seen = sorted(int(m["input_ids"][row, 2]) for rank in step for m in rank for row in range(len(m["input_ids"]))
                  if loss_tokens({"labels": m["labels"][row:row + 1]}))
    assert seen == [3, 4, 5]
    assert batcher.epoch == 1 and batcher.position == 0


@pytest.mark.parametrize("n", [16, 20])
def test_full_steps_and_the_epoch_tail(n):
    batcher = StepBatcher(samples(n), micro_batch_size=2, world_size=2, accumulation=4, pad_token_id=0, seed=0)
    first = batcher.next_step()
    assert sum(loss_tokens(m) for rank in first for m in rank) == 16 * 2
    if n == 20:  # the tail (4 samples) is padded from the epoch's start, as DistributedSampler does
        tail = batcher.next_step()
        assert sum(loss_tokens(m) for rank in tail for m in rank) == 16 * 2
