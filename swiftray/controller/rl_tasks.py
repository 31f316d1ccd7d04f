"""Ray tasks the RL driver launches so that rollout data never passes through the driver.

Each takes ObjectRefs of scored RolloutBatches and returns refs (or small summaries).
They only call the algorithm's methods and the shared batch plumbing.
"""

from __future__ import annotations

import statistics
from typing import Any

import ray

from swiftray.experience import (
    RolloutBatch,
    concat_rollouts,
    rank_slices,
    rejoin_slices,
    select,
    split_for_ranks,
)
from swiftray.rewards import reward_metrics


def _gather(refs: list[ray.ObjectRef]) -> RolloutBatch:
    return concat_rollouts(ray.get(list(refs)))


@ray.remote(num_cpus=0)
def filter_groups(algorithm: Any, refs: list[ray.ObjectRef]) -> tuple[RolloutBatch, tuple[int, int]]:
    """Dynamic sampling: the completions worth training on, and (kept, dropped) counts."""
    batch = _gather(refs)
    keep = algorithm.keep_groups(batch)
    return select(batch, keep), (len(keep), len(batch) - len(keep))


@ray.remote(num_cpus=0)
def make_step_batch(algorithm: Any, refs: list[ray.ObjectRef], batch_plan: Any, pad_token_id: int,
                    policy_version: int, num_logged: int) -> tuple:
    """(shard for rank 0 of optimizer step 0, ..., rank N-1 of the last optimizer step, summary).

    Advantages are computed over the whole generation; its rows are then cut into the generation's
    optimizer steps (--steps_per_generation) and each step's rows into per-rank micro-batches.
    """
    batch = _gather(refs)
    size = batch_plan.completions_per_generation
    if len(batch) > size:
        batch = select(batch, list(range(size)))
    staleness = policy_version - batch.version
    if staleness > algorithm.max_staleness:
        raise RuntimeError(f"rollouts from weight version {batch.version} are {staleness} steps behind the "
                           f"policy (version {policy_version}); {algorithm.name} allows {algorithm.max_staleness}")
    rows = algorithm.make_experience(batch, pad_token_id)
    experience_metrics = algorithm.experience_metrics(batch, rows)
    per_step = batch_plan.samples_per_optimizer_step
    shards = []
    for k in range(batch_plan.optimizer_steps_per_generation):
        step_rows = {key: value[k * per_step:(k + 1) * per_step] for key, value in rows.items()}
        shards += split_for_ranks(step_rows, batch_plan.world_size, batch_plan.micro_batch_size)
    timings = {f"time/{k}": v for k, v in batch.timings.items()}
    summary = {"metrics": {**rollout_metrics(batch), **timings, **experience_metrics, "staleness": staleness,
                           **advantage_abs_mean(rows)},
               "completions": completion_rows(batch, num_logged)}
    return (*shards, summary)


def advantage_abs_mean(rows: dict[str, Any]) -> dict[str, float]:
    """advantage/abs_mean: mean |advantage| over completions (one per sequence) or over completion tokens
    (per-token ones); nothing for an algorithm without advantages (distillation)."""
    advantages = rows.get("advantages")
    if advantages is None:
        return {}
    if advantages.dim() == 1:
        return {"advantage/abs_mean": float(advantages.abs().mean())}
    mask = rows["labels"][:, 1:] != -100
    return {"advantage/abs_mean": float(advantages[mask].abs().mean()) if mask.any() else 0.0}


@ray.remote(num_cpus=0)
def split_rollouts(refs: list[ray.ObjectRef], size: int, world_size: int) -> tuple:
    """(the step's first `size` rollouts as one batch, then its equal slice for each rank)."""
    batch = _gather(refs)
    if len(batch) > size:
        batch = select(batch, list(range(size)))
    return (batch, *rank_slices(batch, world_size))


@ray.remote(num_cpus=0)
def join_rollouts(whole: RolloutBatch, *slices: RolloutBatch) -> RolloutBatch:
    """The rank slices, annotated, as the step's one batch again."""
    return rejoin_slices(whole, list(slices))


@ray.remote(num_cpus=0)
def attach_old_logprobs(shard: list[dict[str, Any]], logprobs: list[Any]) -> list[dict[str, Any]]:
    """A rank's micro-batches with `old_logprobs`: the policy's log-probs before the step's first update."""
    if len(shard) != len(logprobs):
        raise ValueError(f"{len(logprobs)} log-prob tensors for {len(shard)} micro-batches")
    return [{**micro, "old_logprobs": lp} for micro, lp in zip(shard, logprobs)]


@ray.remote(num_cpus=0)
def score_eval(refs: list[ray.ObjectRef]) -> dict[str, float]:
    """Held-out metrics: mean of each reward over greedy completions, and their length."""
    batch = _gather(refs)
    return rollout_metrics(batch)


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    lengths = [len(c) for c in batch.completion_ids]
    out = reward_metrics(batch.reward_per_func, batch.rewards or None)  # no rewards: distillation
    out.update({
        "completions/mean_length": statistics.fmean(lengths),
        "completions/max_length": float(max(lengths)),
        "completions/min_length": float(min(lengths)),
        "completions/clipped_ratio": sum(batch.truncated) / len(batch),
        "rollout/version": float(batch.version),
    })
    return out


def completion_rows(batch: RolloutBatch, limit: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(min(limit, len(batch))):
        messages = batch.columns.get("messages", [None] * len(batch))[i]
        prompt = messages[-1]["content"] if messages else None
        rows.append({"prompt": prompt, "completion": batch.completions[i],
                     "reward": batch.rewards[i] if batch.rewards else None,
                     **{k: v[i] for k, v in batch.reward_per_func.items()}})
    return rows
