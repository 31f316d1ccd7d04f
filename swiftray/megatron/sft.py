"""`swiftray megatron sft`: the Megatron policy group, fed by the dataset, one iteration at a time.

The same loop as `swiftray sft` (controller/sft.py), and the same pieces: the data pipeline,
StepBatcher, the Tracker and the checkpoint folders. What changes is the group (Megatron ranks
arranged TP x PP x EP x DP), that data is cut per data-parallel rank (model-parallel peers get
the same micro-batches), and Megatron-SWIFT's schedule flags (`--train_iters`, `--save_interval`,
`--eval_interval`, `--lr_warmup_iters`, `--min_lr`...).

    run_dir = --save/vN-timestamp/       args.json, logging.jsonl, runs/, images/
        checkpoint-N/                    megatron-core weights (mcore_config.json, mcore_model*.safetensors),
                                         config.json, tokenizer, train_state/ (per-rank optimizer, RNG),
                                         trainer_state.json (iteration, data position), args.json

`--load checkpoint-N --finetune false` resumes (same losses as an uninterrupted run);
`swiftray export --mcore_model checkpoint-N --to_hf true` gives an HF folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray

from swiftray import checkpoint as ckpt
from swiftray.actors.group import ActorGroup
from swiftray.actors.megatron_policy import MegatronPolicyActor, dp_shards
from swiftray.algorithms.sft import SFT
from swiftray.cluster import init_ray
from swiftray.controller.common import mean_metrics, seed_everything
from swiftray.data.batching import StepBatcher, eval_batches
from swiftray.data.pipeline import encode_dataset, load_train_val
from swiftray.data.template import Template
from swiftray.megatron.arguments import MegatronSftArguments
from swiftray.models.loader import load_tokenizer
from swiftray.paths import absolute
from swiftray.placement import cluster_from_ray
from swiftray.plan import data_plan
from swiftray.tracking import Tracker

logger = logging.getLogger("swiftray")


def policy_config(args: MegatronSftArguments, total_steps: int, warmup: int, dtype: str) -> dict[str, Any]:
    """MegatronPolicyActor's config from the flags."""
    recompute = None if args.recompute_granularity == "none" else args.recompute_granularity
    aux = args.moe_aux_loss_coeff
    if aux is None:  # as Megatron-SWIFT: the model's own coefficient
        from swiftray.megatron.convert import model_shape_of

        aux = model_shape_of(args.load).router_aux_loss_coef
    return {
        "model_dir": absolute(args.load), "torch_dtype": dtype, "seed": args.seed,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "expert_model_parallel_size": args.expert_model_parallel_size,
        "expert_tensor_parallel_size": args.expert_tensor_parallel_size,
        "sequence_parallel": args.sequence_parallel,
        "transformer_impl": "auto" if args.transformer_impl == "transformer_engine" else "local",
        "use_distributed_optimizer": args.use_distributed_optimizer,
        "moe_aux_loss_coeff": aux, "moe_grouped_gemm": args.moe_grouped_gemm,
        "moe_shared_expert_overlap": args.moe_shared_expert_overlap,
        "moe_token_dispatcher_type": args.moe_token_dispatcher_type,
        "moe_router_load_balancing_type": args.moe_router_load_balancing_type,
        "recompute_granularity": recompute, "recompute_method": args.recompute_method,
        "recompute_num_layers": args.recompute_num_layers, "recompute_modules": list(args.recompute_modules),
        "cross_entropy_loss_fusion": args.cross_entropy_loss_fusion, "use_flash_attn": args.use_flash_attn,
        "learning_rate": args.lr, "min_lr": args.min_lr, "weight_decay": args.weight_decay,
        "adam_betas": (args.adam_beta1, args.adam_beta2), "adam_epsilon": args.adam_eps,
        "lr_scheduler_type": args.lr_decay_style, "warmup_steps": warmup, "lr_decay_steps": args.lr_decay_iters,
        "total_steps": total_steps, "max_grad_norm": args.clip_grad,
    }


def worker_resources(world_size: int) -> tuple[float, float]:
    """(CPUs, GPUs) per Megatron rank: a GPU each when the cluster has enough, the cores shared out."""
    cluster = cluster_from_ray()
    return max(0.5, round(cluster.cpus / world_size / 2, 2)), 1.0 if cluster.gpus >= world_size else 0.0


def start_group(args: MegatronSftArguments, config: dict[str, Any]) -> tuple[ActorGroup, list[int]]:
    """The Megatron ranks, set up; and each rank's data-parallel rank."""
    num_cpus, num_gpus = worker_resources(args.world_size)
    if args.num_cpus_per_worker:
        num_cpus = args.num_cpus_per_worker
    group = ActorGroup(MegatronPolicyActor, args.world_size, num_cpus_per_worker=num_cpus,
                       num_gpus_per_worker=num_gpus, name="megatron-policy")
    try:
        counts = ray.get(group.call_all("setup", config))[0]
        layout = ray.get(group.call_all("layout"))
    except Exception:
        group.shutdown()
        raise
    logger.info("Megatron policy: %d ranks = TP %d x PP %d x DP %d (EP %d), %d parameters", args.world_size,
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size,
                args.expert_model_parallel_size, counts["num_params"])
    return group, [rank["dp_rank"] for rank in layout]


def _resume_state(args: MegatronSftArguments) -> dict[str, Any] | None:
    """trainer_state.json of --load when it is a checkpoint to resume (not --finetune), else None."""
    state_file = Path(args.load) / ckpt.TRAINER_STATE
    if args.finetune or not state_file.is_file():
        return None
    return ckpt.read_trainer_state(args.load)


def run_megatron_sft(args: MegatronSftArguments) -> Path | None:
    """Train; return the run folder (None on a node other than NODE_RANK 0)."""
    if args.node_rank != 0:
        logger.info("NODE_RANK=%d: swiftray drives every node from NODE_RANK 0 over its Ray cluster; join this "
                    "node to it (`ray start --address=<head>:6379`) instead of running the command here",
                    args.node_rank)
        return None
    seed_everything(args.seed)
    args.output_dir = args.save  # start_run's name for the output folder
    run_dir = ckpt.make_run_dir(args.output_dir, args.add_version)
    ckpt.write_json(run_dir / "args.json", ckpt.args_to_dict(args))
    tokenizer = load_tokenizer(args.load)
    template = Template(tokenizer, default_system=args.system, max_length=args.max_length,
                        truncation_strategy=args.truncation_strategy, loss_scale=args.loss_scale)
    train_ds, val_ds = load_train_val(data_plan(args))
    train = encode_dataset(train_ds, template, num_proc=args.dataset_num_proc, name="train")
    val = encode_dataset(val_ds, template, num_proc=args.dataset_num_proc, name="val") if val_ds else []
    logger.info("%d training samples, %d validation samples", len(train), len(val))
    batcher = StepBatcher(train, micro_batch_size=args.micro_batch_size, world_size=args.data_parallel_size,
                          accumulation=args.accumulation, pad_token_id=tokenizer.pad_token_id, seed=args.data_seed,
                          shuffle=args.dataset_shuffle, packing=args.packing, max_length=args.max_length)
    total_steps, warmup = args.schedule(batcher.steps_per_epoch)
    init_ray(args.ray_address)
    on_gpu = worker_resources(args.world_size)[1] > 0
    args.explain_gpu_only(on_gpu)
    dtype = args.torch_dtype or _checkpoint_dtype(args.load, on_gpu)
    if on_gpu and args.use_flash_attn and args.packing:
        logger.info("--use_flash_attn true with --packing true: packed rows need megatron-core's THD layout, which "
                    "swiftray does not build yet; attention runs with a block-diagonal mask instead")
        args.use_flash_attn = False
    group, dp_ranks = start_group(args, policy_config(args, total_steps, warmup, dtype))

    step, resume = 0, _resume_state(args)
    if resume is not None:
        ray.get(group.call_all("load_checkpoint", absolute(args.load), not args.no_load_optim, not args.no_load_rng))
        batcher.load_state_dict(resume["data"])
        step = resume["global_step"]
        logger.info("resumed from %s at iteration %d", args.load, step)
    tracker = Tracker(run_dir, args.report_to, total_steps=total_steps, initial_step=step, config=vars(args),
                      desc="megatron sft")
    val_shards = _eval_shards(args, val, tokenizer.pad_token_id, dp_ranks)
    algorithm = SFT()
    try:
        while step < total_steps:
            step += 1
            shards = [ray.put(batches) for batches in batcher.next_step()]
            metrics = mean_metrics(ray.get(group.call_all_ranked("train_step", dp_shards(shards, dp_ranks),
                                                                 algorithm.loss)))
            metrics["epoch"] = round(batcher.epoch + batcher.position / max(1, len(batcher._units)), 4)
            tracker.advance(postfix={"loss": metrics["loss"]})
            if step == 1 or step % args.log_interval == 0 or step == total_steps:
                tracker.log(step, metrics, prefix="train/")
            if val_shards and (step % args.eval_interval == 0 or step == total_steps):
                tracker.log(step, mean_metrics(ray.get(group.call_all_ranked("eval_step", val_shards, algorithm.loss))),
                            prefix="eval/")
            if step % args.save_interval == 0 or step == total_steps:
                logger.info("saved %s", _save(group, run_dir, step, tokenizer, args, batcher))
    finally:
        tracker.close()
        group.shutdown()
    logger.info("last checkpoint: %s", ckpt.latest_checkpoint(run_dir))
    return run_dir


def _save(group: ActorGroup, run_dir: Path, step: int, tokenizer: Any, args: MegatronSftArguments,
          batcher: StepBatcher) -> Path:
    """checkpoint-STEP, written aside and renamed into place (as swiftray sft's)."""
    staging = ckpt.staging_dir(run_dir, step)
    ray.get(group.call_all("save_checkpoint", absolute(staging), False, not args.no_save_optim, not args.no_save_rng))
    tokenizer.save_pretrained(staging)
    ckpt.write_json(staging / "args.json", ckpt.args_to_dict(args))
    ckpt.write_json(staging / ckpt.TRAINER_STATE, {"global_step": step, "data": batcher.state_dict()})
    final = ckpt.commit_checkpoint(staging, ckpt.checkpoint_dir(run_dir, step))
    for path in ckpt.prune_checkpoints(run_dir, args.save_total_limit, None):
        logger.info("removed old checkpoint %s (--save_total_limit %s)", path.name, args.save_total_limit)
    return final


def _eval_shards(args: MegatronSftArguments, val: list[dict], pad_id: int, dp_ranks: list[int]) -> list | None:
    """--eval_iters global batches of validation samples (all of them when <= 0), per rank."""
    if not val:
        return None
    if args.eval_iters > 0:
        val = val[: args.eval_iters * args.global_batch_size]
    per_dp = eval_batches(val, batch_size=args.micro_batch_size, world_size=args.data_parallel_size,
                          pad_token_id=pad_id)
    return dp_shards([ray.put(batches) for batches in per_dp], dp_ranks)


def _checkpoint_dtype(folder: str, on_gpu: bool) -> str:
    """config.json's dtype on GPU; float32 on CPU (as swiftray sft)."""
    if not on_gpu:
        return "float32"
    from swiftray.megatron.convert import read_json

    config = read_json(Path(folder) / "config.json")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16"
