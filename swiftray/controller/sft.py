"""`swiftray sft`: the policy actor group, fed by the dataset, one optimizer step at a time.

    samples  = tokenise(--dataset)                      # on the driver, cached by datasets
    for step in steps:
        shards  = [ray.put(rank's micro-batches) for rank]   # each rank pulls its own
        metrics = policy.train_step(shard, sft.loss)      # all ranks, one step
        eval / save / log on their schedules
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import ray

from swiftray import checkpoint as ckpt
from swiftray.algorithms.sft import SFT
from swiftray.cluster import init_ray
from swiftray.controller.common import (
    absolute,
    is_better,
    save_checkpoint,
    seed_everything,
    start_policy_group,
    start_run,
)
from swiftray.data.batching import StepBatcher, eval_batches
from swiftray.data.pipeline import encode_dataset, load_train_val
from swiftray.data.template import Template
from swiftray.models.loader import load_tokenizer
from swiftray.tracking import Tracker

logger = logging.getLogger("swiftray")


def total_steps_for(args: Any, steps_per_epoch: int) -> int:
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def mean_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Ranks report the same all-reduced values for loss/grad_norm; average the rest."""
    keys = per_rank[0].keys()
    return {k: sum(m[k] for m in per_rank) / len(per_rank) for k in keys}


def run_sft(args: Any) -> Path:
    """Train; return the run folder."""
    seed_everything(args.seed)
    resume = args.resume_from_checkpoint
    if resume and not args.model:
        args.model = ckpt.read_args(resume)["model"]
    run_dir = start_run(args)
    tokenizer = load_tokenizer(args.model)
    template = Template(tokenizer, default_system=args.system, max_length=args.max_length,
                        truncation_strategy=args.truncation_strategy, loss_scale=args.loss_scale)
    train_ds, val_ds = load_train_val(args)
    train = encode_dataset(train_ds, template, num_proc=args.dataset_num_proc, name="train")
    val = encode_dataset(val_ds, template, num_proc=args.dataset_num_proc, name="val") if val_ds else []
    logger.info("%d training samples, %d validation samples", len(train), len(val))

    batcher = StepBatcher(train, micro_batch_size=args.per_device_train_batch_size, world_size=args.world_size,
                          accumulation=args.gradient_accumulation_steps, pad_token_id=tokenizer.pad_token_id,
                          seed=args.data_seed, shuffle=args.dataset_shuffle, packing=args.packing,
                          max_length=args.max_length, attn_impl=args.attn_impl)
    total_steps = total_steps_for(args, batcher.steps_per_epoch)
    init_ray(args.ray_address)
    policy = start_policy_group(args, total_steps)
    algorithm = SFT()

    step, best_metric, best_ckpt = 0, None, None
    if resume:
        state = ckpt.read_trainer_state(resume)
        ray.get(policy.call_all("load_checkpoint", absolute(resume)))
        batcher.load_state_dict(state["data"])
        step, best_metric = state["global_step"], state.get("best_metric")
        logger.info("resumed from %s at step %d", resume, step)

    tracker = Tracker(run_dir, args.report_to, total_steps=total_steps, initial_step=step,
                      config=vars(args), desc="sft")
    val_shards = eval_batches(val, batch_size=args.per_device_eval_batch_size, world_size=args.world_size,
                              pad_token_id=tokenizer.pad_token_id) if val else None
    try:
        while step < total_steps:
            step += 1
            shards = [ray.put(micro_batches) for micro_batches in batcher.next_step()]
            metrics = mean_metrics(ray.get(policy.call_all_ranked("train_step", shards, algorithm.loss)))
            metrics["epoch"] = round(batcher.epoch + batcher.position / max(1, len(batcher._units)), 4)
            tracker.advance(postfix={"loss": metrics["loss"]})
            if step == 1 and args.logging_first_step or step % args.logging_steps == 0 or step == total_steps:
                tracker.log(step, metrics, prefix="train/")
            eval_now = val_shards and args.eval_strategy != "no" and (step % args.eval_steps == 0
                                                                      or step == total_steps)
            if eval_now:
                eval_metrics = mean_metrics(ray.get(policy.call_all_ranked("eval_step", val_shards, algorithm.loss)))
                tracker.log(step, eval_metrics, prefix="eval/")
                name = args.metric_for_best_model
                current = eval_metrics.get(name.removeprefix("eval_"))
                if current is not None and is_better(current, best_metric, name):
                    best_metric, best_ckpt = current, ckpt.checkpoint_dir(run_dir, step)
            save_now = args.save_strategy != "no" and (step % args.save_steps == 0 or step == total_steps)
            if save_now:
                state = {"global_step": step, "total_steps": total_steps, "data": batcher.state_dict(),
                         "best_metric": best_metric, "best_model_checkpoint": str(best_ckpt) if best_ckpt else None}
                path = save_checkpoint(policy, run_dir, step, tokenizer=tokenizer, args=args,
                                       trainer_state=state, best=best_ckpt if best_ckpt and best_ckpt.exists() else None)
                logger.info("saved %s", path)
    finally:
        tracker.close()
        policy.shutdown()
    last = ckpt.latest_checkpoint(run_dir)
    logger.info("last_model_checkpoint: %s", last)
    logger.info("best_model_checkpoint: %s", best_ckpt if best_ckpt and best_ckpt.exists() else last)
    return run_dir
