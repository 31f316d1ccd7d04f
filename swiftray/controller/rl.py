"""`swiftray rlhf`: the RL driver loop. The only place that sequences the roles.

    for step in steps:
        prompts  = sampler.next()                            # small rows, on the driver
        rollouts = rollout.generate(prompts)                 # ObjectRefs from here on
        scored   = reward.score(rollouts)                    # rollout -> reward -> reference, actor to actor
        scored   = reference.attach_logprobs(scored)         # only when beta != 0
        shards   = make_step_batch(algorithm, scored)        # a Ray task: advantages, one shard per rank
        metrics  = policy.train_step(shard, algorithm.loss)  # each rank pulls its own shard (x num_iterations)
        rollout.update_weights(version, policy.export_weights())

With --async_generate the next step's rollouts are requested before this
step trains, so generation overlaps training and rollouts are one version old.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
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
from swiftray.controller.rl_data import (
    PromptSampler,
    driver_rewards,
    encode_prompts,
    hardware_warnings,
    readable_error,
    reward_kwargs,
    ship_plugins_by_value,
)
from swiftray.controller.rl_tasks import attach_old_logprobs, filter_groups, make_step_batch, score_eval
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

    def __init__(self, args: Any, algorithm: Any, total_optimizer_steps: int):
        self.policy = self.rollout = self.reward = self.reference = None
        self.shared_sync = False
        try:
            self._start(args, algorithm, total_optimizer_steps)
        except BaseException:
            self.shutdown()  # a role that failed to set up must not leave the others running
            raise

    def _start(self, args: Any, algorithm: Any, total_optimizer_steps: int) -> None:
        num_rollout = args.num_infer_workers or 1
        rollout_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= args.world_size + num_rollout else 0.0
        rollout_cfg = {"model_dir": args.model, "engine": "vllm" if args.use_vllm else "hf",
                       "torch_dtype": args.torch_dtype, "seed": args.seed,
                       "vllm_gpu_memory_utilization": args.vllm_gpu_memory_utilization,
                       "vllm_max_model_len": args.vllm_max_model_len,
                       "vllm_tensor_parallel_size": args.vllm_tensor_parallel_size,
                       "vllm_enable_prefix_caching": args.vllm_enable_prefix_caching,
                       "sleep_level": args.sleep_level}
        reward_cfg = {"reward_funcs": args.reward_funcs, "reward_weights": args.reward_weights,
                      "reward_kwargs": reward_kwargs(args), "external_plugins": args.external_plugins,
                      "registered": driver_rewards(args.reward_funcs)}
        reference_cfg = {"model_dir": args.ref_model or args.model, "adapters": list(args.adapters),
                         "torch_dtype": args.torch_dtype}

        def group(cls: type, n: int, cpus: float, gpus: float, name: str, config: dict) -> ActorGroup:
            started = ActorGroup(cls, n, num_cpus_per_worker=cpus, num_gpus_per_worker=gpus, name=name)
            ray.get(started.call_all("setup", config))
            return started

        starters = {
            "policy": lambda: start_policy_group(args, total_optimizer_steps, cpu_share=0.5),
            "rollout": lambda: group(RolloutActor, num_rollout, 0.5, rollout_gpus, "rollout", rollout_cfg),
            "reward": lambda: group(RewardActor, 1, 0.25, 0.0, "reward", reward_cfg),
        }
        if algorithm.needs_reference():
            starters["reference"] = lambda: group(ReferenceActor, 1, 0.25, 0.0, "reference", reference_cfg)
        # The roles start side by side: waiting for processes and loading models is most of a short run.
        errors = []
        with ThreadPoolExecutor(len(starters)) as pool:
            futures = {name: pool.submit(start) for name, start in starters.items()}
            for name, future in futures.items():
                try:
                    setattr(self, name, future.result())
                except Exception as err:  # the others still finish, so that shutdown() finds them
                    errors.append(err)
        if errors:
            raise errors[0]
        # Weights go through the policy's shared-memory buffer when every rollout shares its node.
        nodes = ray.get([a.node_id.remote() for a in self.policy.actors[:1] + self.rollout.actors])
        self.shared_sync = len(set(nodes)) == 1
        shares = thread_shares(args.async_generate, args.world_size, len(self.rollout.actors))
        ray.get([actor.use_cores.remote(shares[name]) for name in ("policy", "rollout", "reference")
                 if getattr(self, name) is not None for actor in getattr(self, name).actors])

    def generate_scored(self, prompt_shards: list[Any], params: SamplingParams, seed: int) -> list[ray.ObjectRef]:
        """Rollouts with rewards attached, one ref per busy rollout worker; nothing waits here."""
        gen = [actor.generate.remote(shard, params, seed)
               for actor, shard in zip(self.rollout.actors, prompt_shards) if shard]
        reward = self.reward.actors
        return [reward[i % len(reward)].score_batch.remote(ref) for i, ref in enumerate(gen)]

    def with_reference(self, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        if self.reference is None:
            return refs
        ref_actors = self.reference.actors
        return [ref_actors[i % len(ref_actors)].attach_logprobs.remote(r) for i, r in enumerate(refs)]

    def train(self, shards: list[ray.ObjectRef], algorithm: Any) -> list[dict[str, float]]:
        """num_iterations optimizer steps on the same step batch; returns each one's metrics.

        With more than one, every iteration's ratio is taken against the policy's log-probs from
        before the first update (`old_logprobs`), computed by the policy itself.
        """
        iterations = getattr(algorithm, "num_iterations", 1)
        if iterations > 1:
            old = self.policy.call_all_ranked("compute_logprobs", shards)
            shards = [attach_old_logprobs.remote(shard, lp) for shard, lp in zip(shards, old)]
        out = []
        for _ in range(iterations):
            ranks = ray.get(self.policy.call_all_ranked("train_step", shards, algorithm.loss, with_entropy=True))
            out.append({k: sum(m[k] for m in ranks) / len(ranks) for k in ranks[0]})
        return out

    def sync_weights(self, version: int, bucket_bytes: int = SYNC_BUCKET_BYTES) -> float:
        """Policy -> rollouts (a shared-memory buffer on one node, else the object store); returns
        seconds taken. Returns only once every rollout has loaded the weights: the next export
        may reuse the buffer a rollout read before (shared_weights.py)."""
        start = time.time()
        exports = self.policy.call_all("export_weights", bucket_bytes, shared_memory=self.shared_sync)
        # Rank 0's export goes to the rollouts as a reference (Ray resolves it there): no driver round trip.
        ray.get(self.rollout.call_all("update_weights", version, exports[0]) + exports[1:])
        return time.time() - start

    def shutdown(self) -> None:
        for group in (self.policy, self.rollout, self.reward, self.reference):
            if group is not None:
                group.shutdown()


def thread_shares(async_generate: bool, world_size: int, rollout_workers: int = 1) -> dict[str, float]:
    """Share of a node's cores each role's torch threads use on CPU.

    Synchronous steps run generation, the reference forward and training one after the other, so
    each takes every core in its turn. With --async_generate, generation runs beside the reference
    forward and training: it gets half the cores, they the other half (measured in benchmarks/).
    """
    if not async_generate:
        return {"policy": 1.0 / world_size, "rollout": 1.0 / rollout_workers, "reference": 1.0}
    return {"policy": 0.5 / world_size, "rollout": 0.5 / rollout_workers, "reference": 0.5}


def shard_prompts(rows: list[dict[str, Any]], num_workers: int) -> list[list[dict[str, Any]]]:
    """Contiguous slices so that concatenating the workers' outputs keeps prompt order."""
    size = -(-len(rows) // num_workers)
    return [rows[i * size:(i + 1) * size] for i in range(num_workers)]


def iteration_metrics(per_iteration: list[dict[str, float]]) -> dict[str, float]:
    """The mean over a step's iterations, plus each iteration's clip ratio when there are several."""
    out = {k: sum(m[k] for m in per_iteration) / len(per_iteration) for k in per_iteration[0]}
    if len(per_iteration) > 1:
        for i, m in enumerate(per_iteration, start=1):
            for key in ("clip_ratio/region_mean", "loss", "kl"):
                if key in m:
                    out[f"iter{i}/{key}"] = m[key]
    return out


def run_rlhf(args: Any) -> Path:
    seed_everything(args.seed)
    load_external_plugins(args.external_plugins)  # may register algorithms as well as rewards
    ship_plugins_by_value()
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
    # A step trains num_iterations times on its rollouts: the LR schedule counts optimizer steps.
    roles = Roles(args, algorithm, total_steps * getattr(algorithm, "num_iterations", 1))
    tracker = Tracker(run_dir, args.report_to, total_steps=total_steps, config=vars(args), desc=args.rlhf_type)
    world, micro = args.world_size, args.per_device_train_batch_size
    pad_id = tokenizer.pad_token_id

    def request(step: int, attempt: int = 0) -> dict[str, Any]:
        """Ask for one step's scored rollouts; `attempt` > 0 is a dynamic-sampling resample."""
        rows = [train_prompts[i] for i in sampler.take(prompts_per_step)]
        shards = shard_prompts(rows, len(roles.rollout.actors))
        seed = args.seed + step + 1_000_003 * attempt
        return {"refs": roles.generate_scored(shards, params, seed=seed), "t": time.time()}

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
                refs, dropped, resampled = fill_dynamic(
                    refs, algorithm, args.max_resample_times, completions_per_step,
                    lambda attempt, step=step: request(step, attempt)["refs"])
            refs = roles.with_reference(refs)
            *shards, summary_ref = make_step_batch.options(num_returns=world + 1).remote(
                algorithm, refs, world, micro, pad_id, completions_per_step, step - 1,
                completions_per_step if args.log_completions else 0)
            t = time.time()
            train = iteration_metrics(roles.train(shards, algorithm))
            timings["time/train_s"] = time.time() - t
            summary = ray.get(summary_ref)
            # Every step ends synced, so that evaluation and the next rollouts see the trained weights.
            timings["time/sync_weights_s"] = roles.sync_weights(step)
            if not args.async_generate and step < total_steps:
                pending = request(step + 1)
            metrics = {**train, **summary.pop("metrics"), **timings,
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
    except ray.exceptions.RayTaskError as err:
        # An actor's own message (e.g. which reward function failed on which sample), not Ray's wrapping.
        raise readable_error(err) from err
    finally:
        tracker.close()
        roles.shutdown()
    logger.info("last_model_checkpoint: %s", ckpt.latest_checkpoint(run_dir))
    return run_dir


def fill_dynamic(refs: list[ray.ObjectRef], algorithm: Any, max_resample_times: int, needed: int,
                 resample: Any) -> tuple[list[ray.ObjectRef], int, int]:
    """DAPO dynamic sampling: keep the groups whose rewards differ, generating more until the step is full.

    `resample(attempt)` returns refs of freshly scored rollouts. Returns (refs to train on, completions
    dropped, resampling rounds). If max_resample_times rounds do not fill the step, it trains on its
    first, unfiltered rollouts, as ms-swift does.
    """
    original = refs
    kept_refs, kept, dropped = [], 0, 0
    for attempt in range(max_resample_times + 1):
        if attempt:
            refs = resample(attempt)
        batch_ref, counts_ref = filter_groups.options(num_returns=2).remote(algorithm, refs)
        n_kept, n_dropped = ray.get(counts_ref)
        kept_refs.append(batch_ref)
        kept, dropped = kept + n_kept, dropped + n_dropped
        if kept >= needed:
            return kept_refs, dropped, attempt
    logger.warning("dynamic sampling: %d of %d completions have varied rewards after %d resamples; "
                   "training on the step's unfiltered rollouts", kept, needed, max_resample_times)
    return original, dropped, max_resample_times
