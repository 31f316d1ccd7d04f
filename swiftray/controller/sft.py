"""`swiftray sft`: the policy actor group, fed by the dataset, one optimizer step at a time.

    samples  = tokenise(--dataset)                      # on the driver, cached by datasets
    for step in steps:
        shards  = [ray.put(rank's micro-batches) for rank]   # each rank pulls its own
        metrics = policy.train_step(shard, sft.loss)      # all ranks, one step
        log / eval / save on the plan's schedule
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray

from swiftray import checkpoint as ckpt
from swiftray.algorithms.sft import SFT
from swiftray.controller.common import (
    finish,
    load_checkpoint,
    mean_metrics,
    plan_or_print,
    planning_cluster,
    resume_model,
    save_checkpoint,
    seed_everything,
    start_run,
)
from swiftray.controller.roles import RunningRoles
from swiftray.data.batching import StepBatcher, eval_batches
from swiftray.data.pipeline import encode_dataset, load_train_val, make_template
from swiftray.models.loader import load_tokenizer
from swiftray.plan import build_plan
from swiftray.schedule import BestCheckpoint
from swiftray.tracking import Tracker

logger = logging.getLogger("swiftray")


def run_sft(args: Any) -> Path | None:
    """Train; return the run folder (None with --print_plan)."""
    seed_everything(args.seed)
    resume_model(args)
    algorithm = SFT()
    draft = build_plan(args, algorithm, planning_cluster(args), command="sft")  # every flag checked
    tokenizer = load_tokenizer(draft.model, template=draft.template.template)
    template = make_template(tokenizer, draft.template)
    train_ds, val_ds = load_train_val(draft.data)
    train = encode_dataset(train_ds, template, num_proc=draft.data.num_proc, name="train")
    val = encode_dataset(val_ds, template, num_proc=draft.data.num_proc, name="val") if val_ds else []
    logger.info("%d training samples, %d validation samples", len(train), len(val))
    b = draft.batch
    batcher = StepBatcher(train, micro_batch_size=b.micro_batch_size, world_size=b.world_size,
                          accumulation=b.accumulation, pad_token_id=tokenizer.pad_token_id, seed=draft.data.seed,
                          shuffle=draft.data.shuffle, packing=draft.template.packing,
                          max_length=draft.template.max_length, attn_impl=args.attn_impl)
    plan = plan_or_print(args, algorithm, batcher.num_units, "sft")
    if plan is None:
        return None
    schedule = plan.schedule

    run_dir = start_run(args, plan)
    roles = RunningRoles(plan)
    policy = roles["policy"]
    step, best = 0, BestCheckpoint()
    if schedule.resume_from_checkpoint:
        state = load_checkpoint({"policy": policy}, schedule.resume_from_checkpoint)
        batcher.load_state_dict(state["data"])
        step = state["global_step"]
        best = BestCheckpoint(state.get("best_metric"), _path(state.get("best_model_checkpoint")))
        logger.info("resumed from %s at step %d", schedule.resume_from_checkpoint, step)

    tracker = Tracker(run_dir, list(plan.output.report_to), total_steps=schedule.total_steps, initial_step=step,
                      config=vars(args), desc="sft")
    val_shards = eval_batches(val, batch_size=b.eval_batch_size, world_size=b.world_size,
                              pad_token_id=tokenizer.pad_token_id) if val else None
    try:
        while step < schedule.total_steps:
            step += 1
            shards = [ray.put(micro_batches) for micro_batches in batcher.next_step()]
            metrics = mean_metrics(ray.get(policy.call_all_ranked("train_step", shards, algorithm.loss)))
            metrics["epoch"] = round(batcher.epoch + batcher.position / max(1, batcher.num_units), 4)
            tracker.advance(postfix={"loss": metrics["loss"]})
            if schedule.log_now(step):
                tracker.log(step, metrics, prefix="train/")
            if val_shards and schedule.eval_now(step):
                eval_metrics = mean_metrics(ray.get(policy.call_all_ranked("eval_step", val_shards, algorithm.loss)))
                tracker.log(step, eval_metrics, prefix="eval/")
                best.update(schedule, eval_metrics, ckpt.checkpoint_dir(run_dir, step))
            if schedule.save_now(step):
                state = {"global_step": step, "total_steps": schedule.total_steps, "data": batcher.state_dict(),
                         "best_metric": best.metric,
                         "best_model_checkpoint": str(best.checkpoint) if best.checkpoint else None}
                path = save_checkpoint({"policy": policy}, run_dir, step, plan=plan, tokenizer=tokenizer,
                                       args=args, trainer_state=state, best=best)
                logger.info("saved %s", path)
    finally:
        tracker.close()
        roles.shutdown()
    finish(run_dir, best)
    return run_dir


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
