"""The dataset-fed loop: `swiftray sft`, and `swiftray rlhf` for algorithms whose data is the dataset
(DPO, KTO, ORPO, SimPO, CPO, RM). The policy actor group, fed one optimizer step at a time:

    kind     = data kind the algorithm names          # sft samples, preference pairs, KTO examples
    samples  = kind.encode(--dataset)                 # on the driver, cached by datasets
    [ref_logps of every sample, once]                 # annotate-phase roles, with --precompute_ref_log_probs
    for step in steps:
        shards  = [ray.put(rank's micro-batches) for rank]    # each rank pulls its own
        shards  = reference.annotate_rows(shard) ...          # annotate-phase roles, actor to actor (refs)
        metrics = policy.train_step(shard, algorithm.loss)    # all ranks, one step
        algorithm.observe(metrics); log / eval / save on the plan's schedule

SFT has no annotate-phase role, so for it the loop is the three lines it always was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray

from swiftray import checkpoint as ckpt
from swiftray.algorithms import get_algorithm
from swiftray.algorithms.base import Algorithm
from swiftray.algorithms.sft import SFT
from swiftray.controller.common import (
    check_inputs,
    finish,
    load_checkpoint,
    mean_metrics,
    plan_or_print,
    planning_cluster,
    save_checkpoint,
    seed_everything,
    start_run,
)
from swiftray.controller.roles import RunningRoles
from swiftray.data.batching import collate_groups
from swiftray.data.kinds import SFTData, dataset_kind
from swiftray.data.pipeline import load_train_val, make_template
from swiftray.models.loader import load_tokenizer
from swiftray.plan import build_plan
from swiftray.schedule import BestCheckpoint
from swiftray.tracking import Tracker

logger = logging.getLogger("swiftray")
PRECOMPUTE_CHUNK = 16  # samples per call when the reference scores the whole dataset once


def run_sft(args: Any) -> Path | None:
    """`swiftray sft`: train; return the run folder (None with --print_plan)."""
    return run_dataset(args, SFT(), command="sft")


def run_dataset(args: Any, algorithm: Algorithm | None = None, command: str = "rlhf") -> Path | None:
    """Train a dataset-fed algorithm (default: --rlhf_type's); return the run folder (None with --print_plan)."""
    seed_everything(args.seed)
    check_inputs(args)
    algorithm = algorithm or get_algorithm(args.rlhf_type).from_args(args)
    draft = build_plan(args, algorithm, planning_cluster(args), command=command)  # every flag checked
    tokenizer = load_tokenizer(draft.model, template=draft.template.template)
    template = make_template(tokenizer, draft.template)
    kind = dataset_kind(algorithm.dataset_kind)
    train_ds, val_ds = load_train_val(draft.data, normalize=kind.normalize)
    b, pad = draft.batch, tokenizer.pad_token_id
    max_length = draft.template.max_length
    train = kind.prepare(kind.encode(train_ds, template, num_proc=draft.data.num_proc, name="train"), b, max_length)
    val = kind.prepare(kind.encode(val_ds, template, num_proc=draft.data.num_proc, name="val"), b, max_length) \
        if val_ds else []
    logger.info("%d training samples, %d validation samples", len(train), len(val))
    batcher = kind.batcher(train, b, pad_token_id=pad, seed=draft.data.seed, shuffle=draft.data.shuffle,
                           packing=draft.template.packing, max_length=max_length, attn_impl=args.attn_impl)
    plan = plan_or_print(args, algorithm, batcher.num_units, command)
    if plan is None:
        return None
    schedule = plan.schedule

    run_dir = start_run(args, plan)
    roles = RunningRoles(plan)
    policy, annotators = roles["policy"], roles.in_phase("annotate")
    tracker = None
    step, best = 0, BestCheckpoint()
    try:
        if schedule.resume_from_checkpoint:
            state = load_checkpoint({"policy": policy}, schedule.resume_from_checkpoint)
            batcher.load_state_dict(state["data"])
            algorithm.load_state_dict(state.get("algorithm", {}))
            step = state["global_step"]
            best = BestCheckpoint(state.get("best_metric"), _path(state.get("best_model_checkpoint")))
            logger.info("resumed from %s at step %d", schedule.resume_from_checkpoint, step)
        if algorithm.annotate_once and annotators:
            annotate_dataset(annotators, kind, [*train, *val], pad)
            annotators = []  # every row now carries its reference log-probs

        tracker = Tracker(run_dir, list(plan.output.report_to), total_steps=schedule.total_steps,
                          initial_step=step, config=vars(args), desc=algorithm.name)
        val_shards = kind.eval_batches(val, b, pad) if val else None
        while step < schedule.total_steps:
            step += 1
            shards = annotate(annotators, [ray.put(micro_batches) for micro_batches in batcher.next_step()])
            per_rank = ray.get(policy.call_all_ranked("train_step", shards, algorithm.loss))
            metrics = algorithm.summarize(mean_metrics(per_rank))
            algorithm.observe(metrics)
            metrics["epoch"] = round(batcher.epoch + batcher.position / max(1, batcher.num_units), 4)
            tracker.advance(postfix={"loss": metrics["loss"]})
            if schedule.log_now(step):
                tracker.log(step, metrics, prefix="train/")
            if val_shards and schedule.eval_now(step):
                shards = annotate(annotators, [ray.put(s) for s in val_shards])
                eval_metrics = algorithm.summarize(
                    mean_metrics(ray.get(policy.call_all_ranked("eval_step", shards, algorithm.loss))))
                tracker.log(step, eval_metrics, prefix="eval/")
                best.update(schedule, eval_metrics, ckpt.checkpoint_dir(run_dir, step))
            if schedule.save_now(step):
                state = {"global_step": step, "total_steps": schedule.total_steps, "data": batcher.state_dict(),
                         "best_metric": best.metric,
                         "best_model_checkpoint": str(best.checkpoint) if best.checkpoint else None}
                if algorithm.state_dict():
                    state["algorithm"] = algorithm.state_dict()
                path = save_checkpoint({"policy": policy}, run_dir, step, plan=plan, tokenizer=tokenizer,
                                       args=args, trainer_state=state, best=best)
                logger.info("saved %s", path)
    finally:
        if tracker is not None:
            tracker.close()
        roles.shutdown()
    finish(run_dir, best)
    return run_dir


def annotate(groups: list[Any], shards: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    """Pass each rank's shard through every annotate-phase role (the reference adds `ref_logps`), actor
    to actor: the driver holds refs only."""
    for group in groups:
        shards = [group.actors[j % len(group.actors)].annotate_rows.remote(ref) for j, ref in enumerate(shards)]
    return shards


def annotate_dataset(groups: list[Any], kind: SFTData, samples: list[dict[str, Any]], pad_token_id: int) -> None:
    """--precompute_ref_log_probs: the annotate-phase role scores every sample's rows once, in chunks
    spread over its workers; each sample keeps its rows' values (`ref_logps`), which every batch built
    from it then carries."""
    if len(groups) != 1:
        raise ValueError(f"computing annotations once takes one annotate-phase role, got {len(groups)}")
    workers = groups[0].actors
    chunks = [samples[i:i + PRECOMPUTE_CHUNK] for i in range(0, len(samples), PRECOMPUTE_CHUNK)]
    refs = [workers[j % len(workers)].sequence_logps.remote([collate_groups(chunk, kind.collate, pad_token_id)])
            for j, chunk in enumerate(chunks)]
    for chunk, (values,) in zip(chunks, ray.get(refs)):
        per_sample = len(values) // len(chunk)  # rows per sample: 2 for a pair or a KTO example
        for i, sample in enumerate(chunk):
            sample["ref_logps"] = values[i * per_sample:(i + 1) * per_sample].tolist()
    logger.info("reference log-probs computed once for %d samples", len(samples))


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
