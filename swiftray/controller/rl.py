"""`swiftray rlhf`: the RL driver loop, the only place that sequences the roles.

    sync(0)                                               # engines start from the policy's weights
    for step in steps:
        refs = generate(prompts) -> score                 # ObjectRefs from here on, chunk by chunk
        refs = fill_dynamic(refs)                         # if the algorithm resamples filtered groups
        sleep engines                                     # colocated: free their memory for training
        refs = annotate(refs)                             # reference log-probs, a critic's values ...
        shards = make_step_batch(algorithm, refs)          # a Ray task: advantages, one shard per rank
        onload policy; train policy (and trained roles)   # each rank pulls its own shard
        save?; wake engines' weights; sync(step); offload policy; wake KV cache
        log / eval on the plan's schedule

The roles and what runs in each phase come from the plan, which takes them from the algorithm
(algorithms/base.py). Modes (plan.step.mode): "colocated" runs the sleep/wake/offload calls;
"separate" skips them; "async" requests the next step's rollouts before this one trains, so
generation overlaps training and rollouts are one version old.

Faults are handled where RLStep's calls meet them, by modules of their own: work.py re-issues the
chunks of a lost rollout, reward or reference actor (supervision.py replaces it and sizes the elastic
engine pool), weight_sync.py picks each engine's path, and a lost policy rank sends the loop back to
the last snapshot or checkpoint (recovery.py; the `except` around a step). Every step's prompts and
weight versions go to the run folder's ledger.jsonl (ledger.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray

from swiftray import checkpoint as ckpt
from swiftray.algorithms import get_algorithm
from swiftray.controller.common import (
    check_inputs,
    finish,
    load_checkpoint,
    plan_or_print,
    planning_cluster,
    save_checkpoint,
    seed_everything,
    start_run,
)
from swiftray.controller.ledger import Ledger
from swiftray.controller.recovery import PolicyKeeper
from swiftray.controller.rl_data import PromptSampler, encode_prompts, readable_error, ship_plugins_by_value
from swiftray.controller.rl_tasks import (
    attach_old_logprobs,
    filter_groups,
    join_rollouts,
    make_step_batch,
    score_eval,
    split_rollouts,
)
from swiftray.controller.roles import RunningRoles
from swiftray.controller.supervision import Supervisor
from swiftray.controller.weight_sync import WeightSync
from swiftray.controller.work import Chunk, Request, Work, ledger_entries
from swiftray.data.pipeline import load_train_val, make_template
from swiftray.models.loader import load_tokenizer
from swiftray.plan import RunPlan, build_plan
from swiftray.rewards import load_external_plugins
from swiftray.schedule import BestCheckpoint
from swiftray.tracking import Tracker

logger = logging.getLogger("swiftray")

SYNC_BUCKET_BYTES = 64 << 20
RESAMPLE_SEED_STRIDE = 1_000_003  # a dynamic-sampling resample's seeds differ from every step's


class RLStep:
    """The calls one RL step makes on the running roles; run_rlhf decides their order."""

    def __init__(self, plan: RunPlan, roles: RunningRoles, pad_token_id: int, run_dir: Path | None = None):
        self.plan, self.roles, self.pad_token_id = plan, roles, pad_token_id
        self.algorithm = plan.algorithm
        # Trained beside the policy on the same shards: the policy and any role in the "train" phase.
        self.trained = {"policy": roles["policy"], **{r.name: roles[r.name] for r in plan.roles_in("train")}}
        # Faults: lost actors replaced and their chunks issued again; every step's prompts in the ledger.
        self.version: int | None = None  # the weight version the engines hold
        self.supervisor = Supervisor(plan, roles, self.catch_up)
        self.work = Work(self.supervisor)
        self.weights = WeightSync(plan, roles, self.supervisor, SYNC_BUCKET_BYTES)
        self.ledger = Ledger(run_dir)
        self.restarts: list[dict[str, Any]] = []  # policy restarts since the last step's ledger line
        self.memory: dict[str, float] = {}
        self.policy_onloaded = False

    def generate(self, rows: list[dict[str, Any]], params: Any, seed: int, ids: list[int] | None = None,
                 step: int | None = None, resample: int = 0) -> Request:
        """Scored rollouts of `rows` (prompt `ids`, for the ledger of `step`; None: evaluation), requested
        now: a chunk of --rollout_batch_size prompts per call, handed to the engines from a queue; chunk j
        samples with seed + j whichever engine runs it. `collect` waits for them."""
        self.supervisor.refresh_pool()  # nodes that joined get engines (elastic pool)
        size = self.plan.batch.rollout_batch_size or len(rows)
        score = [r.name for r in self.plan.roles_in("score")]
        chunks = [Chunk(index=j, stages=["rollout", *score], rows=rows[start:start + size], params=params,
                        seed=seed + j, prompt_ids=list(ids[start:start + size]) if ids is not None else [])
                  for j, start in enumerate(range(0, len(rows), size))]
        return self.work.start(chunks, step, resample)

    def collect(self, request: Request) -> list[ray.ObjectRef]:
        """Refs of a request's scored rollouts, once all are there (lost actors replaced on the way)."""
        refs = self.work.finish(request)
        if request.step is not None:
            entries = ledger_entries(request)
            for entry in entries:
                for cut in entry["reward_timeouts"]:
                    logger.warning("step %d: reward function %r hung on a completion of prompt %s (--reward_timeout); "
                                   "it gets no reward from it", request.step, cut["function"], cut["prompt"])
            self.ledger.add(request.step, entries)
        return refs

    def annotate(self, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Reference log-probs, a critic's values, the policy's own log-probs, ... Roles that do not train
        take each chunk, actor to actor (the driver holds refs; lost actors replaced). Groups that train (and
        so may run collectives: DDP, FSDP) each get an equal slice of the step's rollouts per rank."""
        stages = [r.name for r in self.plan.roles_in("annotate") if "train" not in r.phases]
        if stages:
            refs = self.work.finish(self.work.continue_with(refs, stages))
        collective = [self.roles[r.name] for r in self.plan.roles_in("annotate") if "train" in r.phases]
        if self.algorithm.annotate_with_policy:
            self.onload_policy()
            collective.append(self.roles["policy"])
        if not collective:
            return refs
        b = self.plan.batch
        whole, *slices = split_rollouts.options(num_returns=b.world_size + 1).remote(
            refs, b.completions_per_generation, b.world_size)
        for group in collective:  # model-parallel peers share a slice: one answer per slice goes on
            slices = group.one_per_shard(group.call_all_ranked("annotate", slices))
        return [join_rollouts.remote(whole, *slices)]

    def commit(self, step: int) -> dict[str, float]:
        """Write step's ledger line (its prompts, the weight versions that generated them, the faults met);
        the fault counts, as metrics."""
        faults, self.restarts = self.restarts + self.supervisor.take_events(), []
        line = self.ledger.close(step, step - 1, faults)
        self.work.forget()
        timeouts = sum(len(c.get("reward_timeouts", [])) for c in line["chunks"])
        return {"faults/actors_replaced": float(sum(f["kind"] == "actor_replaced" for f in faults)),
                "faults/engines_added": float(sum(f["kind"] == "engine_added" for f in faults)),
                "faults/policy_restarts": float(sum(f["kind"] == "policy_restarted" for f in faults)),
                "faults/reward_timeouts": float(timeouts), "rollout/engines": float(len(self.roles["rollout"].actors))}

    def catch_up(self, engines: list[Any]) -> None:
        """New engines (replacements, or on nodes that joined) get the policy's weights, which the others hold."""
        if self.version is None:
            return
        exports = self.roles["policy"].call_all("export_weights", SYNC_BUCKET_BYTES, shared_memory=False)
        ray.get([engine.update_weights.remote(self.version, exports[0]) for engine in engines] + exports[1:])

    def rewind(self, step: int, restarts: list[dict[str, Any]]) -> None:
        """The policy went back to the state after `step` (`restarts`: how, for the ledger): requests made
        since are void; the engines re-sync."""
        self.work.abandon()
        self.ledger.rewind(step)
        self.restarts += restarts
        self.sync_weights(step)

    def step_batch(self, refs: list[ray.ObjectRef], version: int, num_logged: int) -> tuple[list[list], Any]:
        """(shards[k][rank] for each optimizer step k of this generation, summary ref): advantages and
        micro-batches, computed in a Ray task."""
        b = self.plan.batch
        steps, world = b.optimizer_steps_per_generation, b.world_size
        *flat, summary = make_step_batch.options(num_returns=steps * world + 1).remote(
            self.algorithm, refs, b, self.pad_token_id, version, num_logged)
        return [flat[k * world:(k + 1) * world] for k in range(steps)], summary

    def train(self, shards: list[list]) -> list[dict[str, float]]:
        """Every optimizer step of the generation, num_iterations times; one averaged metrics dict per
        iteration. When a batch is reused (several optimizer steps or iterations), each ratio is taken
        against the policy's log-probs from before the first update (`old_logprobs`)."""
        iterations = self.algorithm.num_iterations
        if (iterations > 1 or len(shards) > 1) and not self.algorithm.annotate_with_policy:
            policy = self.roles["policy"]
            shards = [[attach_old_logprobs.remote(shard, lp) for shard, lp in
                       zip(step_shards, policy.one_per_shard(policy.call_all_ranked("compute_logprobs", step_shards)))]
                      for step_shards in shards]
        out = []
        for _ in range(iterations):
            per_step = []
            for step_shards in shards:
                policy_inputs = {"with_entropy": True,
                                 **({"with_logits": True} if self.algorithm.loss_needs_logits else {})}
                calls = {name: group.call_all_ranked(
                    "train_step", step_shards, self.algorithm.loss if name == "policy" else self.algorithm.role_loss(name),
                    **(policy_inputs if name == "policy" else {}))
                    for name, group in self.trained.items()}
                results = {name: ray.get(refs) for name, refs in calls.items()}
                metrics = _mean(results["policy"])
                for name, ranks in results.items():
                    if name != "policy":
                        metrics.update({f"{name}/{k}": v for k, v in _mean(ranks).items()})
                per_step.append(metrics)
            out.append(_mean(per_step))
        return out

    def sync_weights(self, version: int) -> float:
        """Policy -> engines, each on its path (weight_sync.py: a shared-memory buffer on policy rank 0's
        node, a broadcast to other nodes); seconds taken. Returns once every engine has loaded the
        weights: the next export may reuse the buffer an engine read before (shared_weights.py)."""
        self.work.flush()  # chunks requested before this sync run on the weights they were requested with
        self.version = version  # what an engine replaced during the sync is caught up to
        return self.weights.sync(version)

    # Colocated mode: the engines and the policy take turns with the devices they share. On GPUs,
    # `memory` records the GiB in use on rank 0's GPU after each call (metrics memory/after_*).
    def sleep_engines(self) -> None:
        if self.plan.step.mode == "colocated" and self.plan.step.sleep_level:
            ray.get(self.roles["rollout"].call_all("sleep", self.plan.step.sleep_level))
            self._measure("after_sleep")

    def wake_engines(self, tags: list[str]) -> None:
        if self.plan.step.mode == "colocated" and self.plan.step.sleep_level:
            ray.get(self.roles["rollout"].call_all("wake_up", tags))
            self._measure(f"after_wake_{tags[0]}")

    def offload_policy(self) -> None:
        s = self.plan.step
        if s.mode == "colocated" and (s.offload_model or s.offload_optimizer):
            ray.get(self.roles["policy"].call_all("offload", model=s.offload_model, optimizer=s.offload_optimizer,
                                                  gc_collect=s.gc_collect_after_offload))
            self._measure("after_offload")
        self.policy_onloaded = False

    def onload_policy(self) -> None:
        """Once per step: before the policy annotates the rollouts (if it does), else before training."""
        s = self.plan.step
        if s.mode == "colocated" and (s.offload_model or s.offload_optimizer) and not self.policy_onloaded:
            ray.get(self.roles["policy"].call_all("onload"))
            self._measure("after_onload")
        self.policy_onloaded = True

    def _measure(self, label: str) -> None:
        if self.plan.cluster.gpus:
            used = ray.get(self.roles["policy"].actors[0].device_memory_gb.remote())
            if used is not None:
                self.memory[f"memory/{label}_gb"] = used


def run_rlhf(args: Any) -> Path | None:
    """Train; return the run folder (None with --print_plan)."""
    seed_everything(args.seed)
    check_inputs(args)
    load_external_plugins(args.external_plugins)  # may register algorithms as well as rewards
    ship_plugins_by_value()
    algorithm = get_algorithm(args.rlhf_type).from_args(args)
    draft = build_plan(args, algorithm, planning_cluster(args), command="rlhf")  # every flag checked
    tokenizer = load_tokenizer(draft.model, template=draft.template.template)
    template = make_template(tokenizer, draft.template)
    train_ds, val_ds = load_train_val(draft.data, allow_no_response=True)
    train_prompts = encode_prompts(train_ds, template, with_responses=algorithm.uses_dataset_responses)
    val_prompts = encode_prompts(val_ds, template) if val_ds is not None else []
    sampler = PromptSampler(len(train_prompts), seed=draft.data.seed, shuffle=draft.data.shuffle)
    plan = plan_or_print(args, algorithm, len(train_prompts), "rlhf")
    if plan is None:
        return None
    schedule, step_plan, b = plan.schedule, plan.step, plan.batch

    run_dir = start_run(args, plan)
    roles = RunningRoles(plan)
    tracker = None
    try:
        rl = RLStep(plan, roles, tokenizer.pad_token_id, run_dir)
        step, best = 0, BestCheckpoint()
        if schedule.resume_from_checkpoint:
            state = load_checkpoint(rl.trained, schedule.resume_from_checkpoint)
            sampler.load_state_dict(state["data"])
            step = state["global_step"]
            best = BestCheckpoint(state.get("best_metric"), Path(state["best_model_checkpoint"])
                                  if state.get("best_model_checkpoint") else None)
            logger.info("resumed from %s at step %d", schedule.resume_from_checkpoint, step)
        tracker = Tracker(run_dir, list(plan.output.report_to), total_steps=schedule.total_steps, initial_step=step,
                          config=vars(args), desc=algorithm.name)

        def request(step: int, attempt: int = 0) -> dict[str, Any]:
            """Ask for one step's scored rollouts; `attempt` > 0 is a dynamic-sampling resample."""
            before = sampler.state_dict()
            ids = sampler.take(b.prompts_per_generation)
            seed = args.seed + step + RESAMPLE_SEED_STRIDE * attempt
            params = algorithm.step_sampling(step, step_plan.sampling)
            return {"work": rl.generate([train_prompts[i] for i in ids], params, seed, ids, step, attempt),
                    "t": time.time(), "sampler_before": before}

        def evaluate(step: int) -> dict[str, float] | None:
            if not val_prompts:
                return None
            refs = rl.collect(rl.generate(val_prompts, step_plan.eval_sampling, args.seed))
            metrics = ray.get(score_eval.remote(refs))
            tracker.log(step, metrics, prefix="eval/")
            return metrics

        def loop_state(step: int, pending: dict[str, Any] | None) -> dict[str, Any]:
            """What a checkpoint keeps of the loop; the sampler as before a pending (async) request."""
            return {"global_step": step, "total_steps": schedule.total_steps,
                    "data": pending["sampler_before"] if pending else sampler.state_dict(),
                    "best_metric": best.metric, "best_model_checkpoint": str(best.checkpoint) if best.checkpoint else None}

        rl.sync_weights(step)  # engines start from exactly the policy's weights (a resumed run's too)
        rl.offload_policy()
        keeper = PolicyKeeper(plan, roles, rl.trained)  # a lost policy rank: back to the last checkpoint
        keeper.start(step, loop_state(step, None), schedule.resume_from_checkpoint)
        if step == 0 and schedule.eval_strategy != "no":
            evaluate(0)
        pending = None
        while step < schedule.total_steps:
            step += 1
            try:
                timings: dict[str, float] = {}
                current = pending or request(step)
                pending = request(step + 1) if step_plan.mode == "async" and step < schedule.total_steps else None
                refs = rl.collect(current["work"])
                timings["time/generate_and_score_s"] = time.time() - current["t"]
                resampled = dropped = 0
                if algorithm.resample_filtered:
                    refs, dropped, resampled = fill_dynamic(
                        refs, algorithm, step_plan.max_resample_times, b.completions_per_generation,
                        lambda attempt, step=step: rl.collect(request(step, attempt)["work"]))
                rl.sleep_engines()
                shards, summary_ref = rl.step_batch(rl.annotate(refs), step - 1,
                                                    b.completions_per_generation if plan.output.log_completions else 0)
                t = time.time()
                rl.onload_policy()
                train = iteration_metrics(rl.train(shards))
                timings["time/train_s"] = time.time() - t
                summary = ray.get(summary_ref)
                if schedule.save_now(step):
                    state = loop_state(step, pending)
                    path = save_checkpoint(rl.trained, run_dir, step, plan=plan, tokenizer=tokenizer, args=args,
                                           trainer_state=state, best=best)
                    keeper.saved(step, path, state)
                if keeper.snapshot_now(step):
                    keeper.snapshot(step, loop_state(step, pending))
                # Every step ends synced, so that evaluation and the next rollouts see the trained weights.
                rl.wake_engines(["weights"])
                timings["time/sync_weights_s"] = rl.sync_weights(step)
                rl.offload_policy()
                rl.wake_engines(["kv_cache"])
            except Exception as err:
                state = keeper.recover(err)  # None: every policy rank is there, so the error is the run's
                if state is None:
                    raise
                step, pending = state["global_step"], None
                sampler.load_state_dict(state["data"])
                best = BestCheckpoint(state.get("best_metric"), Path(state["best_model_checkpoint"])
                                      if state.get("best_model_checkpoint") else None)
                rl.rewind(step, keeper.take_events())
                rl.offload_policy()
                continue
            metrics = {**train, **summary.pop("metrics"), **timings, **rl.commit(step), **rl.memory,
                       "dynamic_sample/dropped": dropped, "dynamic_sample/resampled": resampled}
            if summary.get("completions"):
                tracker.log_table("completions", [{"step": step, **row} for row in summary["completions"]])
            tracker.advance(postfix={"reward": metrics.get("reward", 0.0)})
            if schedule.log_now(step):
                tracker.log(step, metrics, prefix="train/")
            if schedule.eval_now(step):
                eval_metrics = evaluate(step)
                if eval_metrics is not None:
                    best.update(schedule, eval_metrics, ckpt.checkpoint_dir(run_dir, step))
    except ray.exceptions.RayTaskError as err:
        # An actor's own message (e.g. which reward function failed on which sample), not Ray's wrapping.
        raise readable_error(err) from err
    finally:
        if tracker is not None:
            tracker.close()
        roles.shutdown()
    finish(run_dir, best)
    return run_dir


def _mean(metrics: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}


def iteration_metrics(per_iteration: list[dict[str, float]]) -> dict[str, float]:
    """The mean over a step's iterations, plus each iteration's clip ratio, loss and KL when there are several."""
    out = _mean(per_iteration)
    if len(per_iteration) > 1:
        for i, m in enumerate(per_iteration, start=1):
            for key in ("clip_ratio/region_mean", "loss", "kl"):
                if key in m:
                    out[f"iter{i}/{key}"] = m[key]
    return out


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
