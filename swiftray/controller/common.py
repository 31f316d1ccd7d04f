"""Pieces both drivers (SFT and RL) use: the run folder, the policy group, checkpoints."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from swiftray import checkpoint as ckpt
from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor

logger = logging.getLogger("swiftray")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(args: Any) -> Path:
    """The run folder with its args.json; a resumed run continues in a new vN folder, as in ms-swift."""
    run_dir = ckpt.make_run_dir(args.output_dir, args.add_version)
    ckpt.write_json(run_dir / "args.json", ckpt.args_to_dict(args))
    logger.info("run folder: %s", run_dir)
    return run_dir


def absolute(path: str | Path) -> str:
    """Actors on a cluster joined by address do not share the driver's working directory:
    hand them absolute paths. A name that is not a local path is passed through."""
    return str(Path(path).resolve()) if os.path.exists(path) else str(path)


def policy_config(args: Any, total_steps: int) -> dict[str, Any]:
    """Everything a PolicyActor needs to build its model, backend and optimizer."""
    backend = "deepspeed" if args.deepspeed else ("fsdp2" if args.fsdp and args.fsdp != "no" else "ddp")
    return {
        "model_dir": absolute(args.model),
        "torch_dtype": args.torch_dtype or "float32",
        "attn_impl": args.attn_impl,
        "gradient_checkpointing": args.gradient_checkpointing,
        "use_liger_kernel": args.use_liger_kernel,
        "train_type": args.train_type,
        "adapters": [absolute(a) for a in args.adapters],
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": list(args.target_modules),
        "modules_to_save": list(args.modules_to_save),
        "backend": backend,
        "deepspeed": absolute(args.deepspeed) if args.deepspeed else None,  # preset name or JSON path
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "adam_betas": (args.adam_beta1, args.adam_beta2),
        "max_grad_norm": args.max_grad_norm,
        "lr_scheduler_type": args.lr_scheduler_type,
        "warmup_ratio": args.warmup_ratio,
        "warmup_steps": args.warmup_steps,
        "total_steps": total_steps,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
    }


def start_policy_group(args: Any, total_steps: int, cpu_share: float = 1.0) -> ActorGroup:
    """The policy workers (NPROC_PER_NODE x NNODES), set up and ready to train."""
    num_workers = args.world_size
    resources = ray.cluster_resources()
    num_gpus = 1.0 if resources.get("GPU", 0) >= num_workers else 0.0
    if args.num_cpus_per_worker:
        num_cpus = args.num_cpus_per_worker
    else:
        # Fractions of the real cores, so that the other roles of an RL run still place.
        cores = os.cpu_count() or 1
        num_cpus = max(0.5, round(cores * cpu_share / num_workers, 2))
    group = ActorGroup(PolicyActor, num_workers, num_cpus_per_worker=num_cpus,
                       num_gpus_per_worker=num_gpus, name="policy")
    ray.get(group.call_all("setup", policy_config(args, total_steps)))
    return group


def save_checkpoint(group: ActorGroup, run_dir: Path, step: int, *, tokenizer: Any, args: Any,
                    trainer_state: dict[str, Any], best: Path | None) -> Path:
    """Write checkpoint-STEP aside, then rename it into place; prune to --save_total_limit."""
    staging = ckpt.staging_dir(run_dir, step)
    ray.get(group.call_all("save_checkpoint", absolute(staging), args.save_only_model))
    tokenizer.save_pretrained(staging)
    ckpt.write_json(staging / "args.json", ckpt.args_to_dict(args))
    ckpt.write_json(staging / ckpt.TRAINER_STATE, trainer_state)
    final = ckpt.commit_checkpoint(staging, ckpt.checkpoint_dir(run_dir, step))
    removed = ckpt.prune_checkpoints(run_dir, args.save_total_limit, best)
    for path in removed:
        logger.info("removed old checkpoint %s (--save_total_limit %s)", path.name, args.save_total_limit)
    return final


def is_better(metric: float, best: float | None, name: str) -> bool:
    """Lower is better for losses, higher for everything else (accuracy, reward)."""
    if best is None:
        return True
    return metric < best if "loss" in name else metric > best
