"""`swiftray rlhf`: the RL driver loop. The only place that sequences the roles.

    for step in steps:
        prompts  = sampler.next()                            # small rows, on the driver
        rollouts = rollout.generate(prompts)                 # ObjectRefs from here on
        scored   = reward.score(rollouts)                    # rollout -> reward -> reference, actor to actor
        scored   = reference.attach_logprobs(scored)         # only when beta != 0
        shards   = make_step_batch(algorithm, scored)        # a Ray task: advantages, one shard per rank
        metrics  = policy.train_step(shard, algorithm.loss)  # each rank pulls its own shard
        rollout.update_weights(version, policy.export_weights())

With --async_generate the next step's rollouts are requested before this
step trains, so generation overlaps training and rollouts are one version old.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray

from swiftray import checkpoint as ckpt
from swiftray.actors.group import ActorGroup
from swiftray.actors.reference import ReferenceActor
from swiftray.actors.reward import RewardActor
from swiftray.actors.rollout import RolloutActor
from swiftray.algorithms import get_algorithm
from swiftray.cluster import init_ray
from swiftray.controller.common import save_checkpoint, seed_everything, start_policy_group, start_run
from swiftray.controller.rl_data import PromptSampler, encode_prompts, hardware_warnings, reward_kwargs
from swiftray.controller.rl_tasks import filter_groups, make_step_batch, score_eval
from swiftray.data.pipeline import load_train_val
from swiftray.data.template import Template
from swiftray.models.generation import SamplingParams
from swiftray.models.loader import load_tokenizer
from swiftray.rewards import load_external_plugins
from swiftray.tracking import Tracker

logger = logging.getLogger("swiftray")

SYNC_BUCKET_BYTES = 64 << 20


class Roles:
    """The actor groups of one RL run, started with CPU shares that fit the cluster together."""

    def __init__(self, args: Any, algorithm: Any, total_steps: int):
        self.policy = start_policy_group(args, total_steps, cpu_share=0.5)
        num_rollout = args.num_infer_workers or 1
        rollout_cfg = {"model_dir": args.model, "engine": "vllm" if args.use_vllm else "hf",
                       "torch_dtype": args.torch_dtype, "seed": args.seed,
                       "vllm_gpu_memory_utilization": args.vllm_gpu_memory_utilization,
                       "vllm_max_model_len": args.vllm_max_model_len,
                       "vllm_tensor_parallel_size": args.vllm_tensor_parallel_size,
                       "vllm_enable_prefix_caching": args.vllm_enable_prefix_caching,
                       "sleep_level": args.sleep_level}
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= args.world_size + num_rollout else 0.0
        self.rollout = ActorGroup(RolloutActor, num_rollout, num_cpus_per_worker=0.5, num_gpus_per_worker=gpus,
                                  name="rollout")
        self.reward = ActorGroup(RewardActor, 1, num_cpus_per_worker=0.25, name="reward")
        self.reference = None
        waits = [*self.rollout.call_all("setup", rollout_cfg),
                 *self.reward.call_all("setup", {"reward_funcs": args.reward_funcs,
                                                  "reward_weights": args.reward_weights,
                                                  "reward_kwargs": reward_kwargs(args),
                                                  "external_plugins": args.external_plugins})]
        if algorithm.needs_reference():
            self.reference = ActorGroup(ReferenceActor, 1, num_cpus_per_worker=0.25, name="reference")
            waits += self.reference.call_all("setup", {"model_dir": args.ref_model or args.model,
                                                       "adapters": list(args.adapters),
                                                       "torch_dtype": args.torch_dtype})
        ray.get(waits)

    def generate_scored(self, prompt_shards: list[Any], params: SamplingParams, seed: int) -> list[ray.ObjectRef]:
        """Rollouts with rewards attached, one ref per rollout worker; nothing waits here."""
        gen = [actor.generate.remote(shard, params, seed)
               for actor, shard in zip(self.rollout.actors, prompt_shards)]
        reward = self.reward.actors
        return [reward[i % len(reward)].score_batch.remote(ref) for i, ref in enumerate(gen)]

    def with_reference(self, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        if self.reference is None:
            return refs
        ref_actors = self.reference.actors
        return [ref_actors[i % len(ref_actors)].attach_logprobs.remote(r) for i, r in enumerate(refs)]

    def sync_weights(self, version: int) -> float:
        """Policy -> rollout through the object store; returns seconds taken."""
        start = time.time()
        buckets = ray.get(self.policy.call_all("export_weights", SYNC_BUCKET_BYTES))[0]
        ray.get(self.rollout.call_all("update_weights", version, buckets))
        return time.time() - start

    def shutdown(self) -> None:
        for group in (self.policy, self.rollout, self.reward, self.reference):
            if group is not None:
                group.shutdown()


def shard_prompts(rows: list[dict[str, Any]], num_workers: int) -> list[list[dict[str, Any]]]:
    """Contiguous slices so that concatenating the workers' outputs keeps prompt order."""
    size = -(-len(rows) // num_workers)
    return [rows[i * size:(i + 1) * size] for i in range(num_workers)]


def run_rlhf(args: Any) -> Path:
    seed_everything(args.seed)
    load_external_plugins(args.external_plugins)  # may register algorithms as well as rewards
    algorithm = get_algorithm(args.rlhf_type).from_args(args)
    for warning in hardware_warnings(args):
        logger.warning(warning)
    run_dir = start_run(args)
    tokenizer = load_tokenizer(args.model)
    template = Template(tokenizer, default_system=args.system, max_length=args.max_length,
                        truncation_strategy=args.truncation_strategy)
    train_ds, val_ds = load_train_val(args, allow_no_response=True)
    train_prompts = encode_prompts(train_ds, template)
    val_prompts = encode_prompts(val_ds, template) if val_ds is not None else []

    completions_per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if completions_per_step % args.num_generations:
        raise ValueError(f"completions per step ({completions_per_step} = per_device_train_batch_size x workers x "
                         f"gradient_accumulation_steps) must be a multiple of --num_generations "
                         f"{args.num_generations}")
    prompts_per_step = completions_per_step // args.num_generations
    sampler = PromptSampler(len(train_prompts), seed=args.data_seed, shuffle=args.dataset_shuffle)
    total_steps = args.max_steps if args.max_steps > 0 else max(
        1, int(args.num_train_epochs * len(train_prompts) // prompts_per_step))
    params = SamplingParams(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            n=args.num_generations)
    greedy = SamplingParams(max_new_tokens=args.max_completion_length, temperature=0.0, n=1)

    init_ray(args.ray_address)
    roles = Roles(args, algorithm, total_steps)
    tracker = Tracker(run_dir, args.report_to, total_steps=total_steps, config=vars(args), desc=args.rlhf_type)
    world, micro = args.world_size, args.per_device_train_batch_size
    pad_id = tokenizer.pad_token_id

    def request(step: int) -> dict[str, Any]:
        """Ask for one step's scored rollouts (resampling for dynamic sampling happens later)."""
        rows = [train_prompts[i] for i in sampler.take(prompts_per_step)]
        shards = shard_prompts(rows, len(roles.rollout.actors))
        return {"refs": roles.generate_scored(shards, params, seed=args.seed + step), "t": time.time()}

    def evaluate(step: int) -> None:
        if not val_prompts:
            return
        refs = roles.generate_scored(shard_prompts(val_prompts, len(roles.rollout.actors)), greedy, args.seed)
        tracker.log(step, ray.get(score_eval.remote(refs)), prefix="eval/")

    try:
        roles.sync_weights(0)  # rollout engines start from exactly the policy's weights
        evaluate(0)
        pending = request(1)
        for step in range(1, total_steps + 1):
            timings: dict[str, float] = {}
            current = pending
            if args.async_generate and step < total_steps:
                pending = request(step + 1)  # overlaps this step's training
            refs = current["refs"]
            ray.wait(refs, num_returns=len(refs))
            timings["time/generate_and_score_s"] = time.time() - current["t"]
            resampled = dropped = 0
            if algorithm.dynamic_sample:
                refs, dropped, resampled = fill_dynamic(refs, algorithm, args, completions_per_step, request, step)
            t = time.time()
            refs = roles.with_reference(refs)
            ray.wait(refs, num_returns=len(refs))
            timings["time/reference_s"] = time.time() - t
            *shards, summary_ref = make_step_batch.options(num_returns=world + 1).remote(
                algorithm, refs, world, micro, pad_id, completions_per_step, step - 1,
                8 if args.log_completions else 0)
            t = time.time()
            train = ray.get(roles.policy.call_all_ranked("train_step", shards, algorithm.loss))
            timings["time/train_s"] = time.time() - t
            summary = ray.get(summary_ref)
            if not args.async_generate and step < total_steps:
                timings["time/sync_weights_s"] = roles.sync_weights(step)
                pending = request(step + 1)
            elif args.async_generate:
                timings["time/sync_weights_s"] = roles.sync_weights(step)
            metrics = {**{k: sum(m[k] for m in train) / len(train) for k in train[0]},
                       **summary.pop("metrics"), **timings,
                       "dynamic_sample/dropped": dropped, "dynamic_sample/resampled": resampled}
            if summary.get("completions"):
                tracker.log_table("completions", [{"step": step, **row} for row in summary["completions"]])
            tracker.advance(postfix={"reward": metrics.get("reward", 0.0)})
            if step % args.logging_steps == 0 or step == 1 or step == total_steps:
                tracker.log(step, metrics, prefix="train/")
            if step % args.eval_steps == 0 or step == total_steps:
                evaluate(step)
            if args.save_strategy != "no" and (step % args.save_steps == 0 or step == total_steps):
                state = {"global_step": step, "total_steps": total_steps, "data": sampler.state_dict()}
                save_checkpoint(roles.policy, run_dir, step, tokenizer=tokenizer, args=args,
                                trainer_state=state, best=None)
    finally:
        tracker.close()
        roles.shutdown()
    logger.info("last_model_checkpoint: %s", ckpt.latest_checkpoint(run_dir))
    return run_dir


def fill_dynamic(refs: list[ray.ObjectRef], algorithm: Any, args: Any, needed: int, request: Any,
                 step: int) -> tuple[list[ray.ObjectRef], int, int]:
    """DAPO dynamic sampling: drop groups with equal rewards, request more prompts until the step is full."""
    kept_refs, kept, dropped = [], 0, 0
    for attempt in range(args.max_resample_times + 1):
        batch_ref, counts_ref = filter_groups.options(num_returns=2).remote(algorithm, refs)
        n_kept, n_dropped = ray.get(counts_ref)
        kept_refs.append(batch_ref)
        kept, dropped = kept + n_kept, dropped + n_dropped
        if kept >= needed or attempt == args.max_resample_times:
            break
        refs = request(step)["refs"]
    if kept < needed:
        logger.warning("dynamic sampling: %d of %d completions after %d resamples; refilling with dropped groups",
                       kept, needed, args.max_resample_times)
        kept_refs.append(refs[0])  # the last unfiltered batch tops the step up
    return kept_refs, dropped, len(kept_refs) - 1
