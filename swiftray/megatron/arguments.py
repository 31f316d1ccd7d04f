"""`swiftray megatron sft` flags: Megatron-SWIFT's names, meanings and defaults (ms-swift 3.x, the
reference document's `megatron sft` command), with swiftray's own data and template flags.

Megatron's training vocabulary differs from `swiftray sft`'s: a step is an iteration
(`--train_iters`), `--global_batch_size` = `--micro_batch_size` x data-parallel size x
accumulation, `--save` is the output folder, `--load` the model (a megatron-core folder from
`swiftray export --to_mcore true`, an HF folder, or a checkpoint of a previous run).
Data-parallel size = workers / (TP x PP); workers = NPROC_PER_NODE x NNODES.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from swiftray.arguments import ArgumentError, DataArguments, TemplateArguments, arg, launch_world_size

logger = logging.getLogger("swiftray")

# Flags that need a GPU (and TransformerEngine / fused kernels): honoured there, explained on CPU.
GPU_ONLY = {
    "moe_grouped_gemm": "grouped GEMM for the experts needs TransformerEngine on a GPU; the experts run as a loop of GEMMs",
    "use_flash_attn": "flash attention needs a GPU; attention runs as megatron-core's local (unfused) attention",
    "cross_entropy_loss_fusion": "the fused vocab-parallel cross-entropy is a GPU kernel; the unfused one computes the same",
}


@dataclass
class MegatronModelArguments:
    load: str | None = arg(None, "model to train or checkpoint to resume: a megatron-core folder (swiftray export "
                           "--to_mcore true), an HF folder, or a checkpoint-N of a previous run",
                           aliases=["--mcore_model"])
    model: str | None = arg(None, "an HF model folder to start from, instead of --load")
    torch_dtype: str | None = arg(None, "bfloat16 | float16 | float32; unset: the checkpoint's dtype (float32 on CPU)")
    model_name: list[str] | None = arg(None, "the assistant's name for self-cognition data")
    model_author: list[str] | None = arg(None, "the assistant's author for self-cognition data")
    seed: int = arg(42, "random seed for python, numpy, torch and data order")


@dataclass
class MegatronTrainArguments:
    micro_batch_size: int = arg(1, "samples per data-parallel rank per micro-batch")
    global_batch_size: int = arg(16, "samples per iteration: micro_batch_size x data-parallel size x accumulation")
    train_iters: int | None = arg(None, "iterations (optimizer steps) to train; unset: --max_epochs over the data")
    max_epochs: int | None = arg(None, "epochs when --train_iters is unset (default 1)")
    recompute_granularity: str = arg("selective", "activation recomputation: full | selective | none")
    recompute_method: str | None = arg(None, "with full: uniform | block")
    recompute_num_layers: int | None = arg(None, "with full: layers per recomputed unit (uniform) or recomputed (block)")
    recompute_modules: list[str] = arg(["core_attn"], "with selective: core_attn mlp moe ... to recompute")
    lr: float = arg(1e-5, "peak learning rate")
    lr_decay_style: str = arg("cosine", "cosine | linear | constant")
    lr_decay_iters: int | None = arg(None, "iterations of decay; unset: --train_iters")
    lr_warmup_iters: int = arg(0, "iterations of linear warm-up")
    lr_warmup_fraction: float | None = arg(None, "warm-up as a fraction of --train_iters (instead of --lr_warmup_iters)")
    min_lr: float = arg(0.0, "learning rate floor of the decay")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    clip_grad: float = arg(1.0, "gradient-norm clipping (the logged grad_norm is before clipping)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.95, "AdamW beta2")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    log_interval: int = arg(5, "log every N iterations", aliases=["--logging_steps"])
    eval_iters: int = arg(100, "evaluation iterations (global batches of validation data) per evaluation; <= 0: all")
    eval_interval: int | None = arg(None, "evaluate every N iterations; unset: --save_interval",
                                    aliases=["--eval_steps"])
    cross_entropy_loss_fusion: bool = arg(False, "fused vocab-parallel cross-entropy (GPU)")
    use_flash_attn: bool = arg(False, "flash attention (GPU with TransformerEngine)")
    num_workers: int = arg(4, "data loader workers (accepted: samples are tokenised once, before training)")
    report_to: list[str] = arg(["tensorboard"], "loggers: tensorboard wandb none")
    ray_address: str | None = arg(None, "join this Ray cluster (also RAY_ADDRESS); unset: start a local one")
    num_cpus_per_worker: float | None = arg(None, "logical CPUs each Megatron rank asks Ray for; unset: fit the machine")


@dataclass
class MegatronParallelArguments:
    tensor_model_parallel_size: int = arg(1, "TP: ranks each layer's matrices are split over")
    pipeline_model_parallel_size: int = arg(1, "PP: stages the layers are split into")
    sequence_parallel: bool = arg(False, "split activations outside attention/MLP over the TP ranks (needs TP > 1)")
    context_parallel_size: int = arg(1, "CP: only 1 is supported")
    expert_model_parallel_size: int = arg(1, "EP: ranks the experts are split over")
    expert_tensor_parallel_size: int = arg(1, "TP inside each expert")
    use_distributed_optimizer: bool = arg(True, "shard optimizer state over data-parallel ranks (ZeRO-1)")
    transformer_impl: str = arg("transformer_engine", "transformer_engine (GPU, when installed) | local")
    moe_grouped_gemm: bool = arg(False, "grouped GEMM for the experts (GPU with TransformerEngine)")
    moe_shared_expert_overlap: bool = arg(False, "overlap shared experts with dispatch (models with shared experts)")
    moe_aux_loss_coeff: float | None = arg(None, "load-balancing loss coefficient; unset: config.json's router_aux_loss_coef")
    moe_token_dispatcher_type: str = arg("alltoall", "alltoall | allgather")
    moe_router_load_balancing_type: str = arg("aux_loss", "aux_loss | seq_aux_loss | none")


@dataclass
class MegatronCheckpointArguments:
    save: str | None = arg(None, "output folder; each run gets save/vN-YYYYMMDD-HHMMSS", aliases=["--output_dir"])
    save_interval: int = arg(500, "save a checkpoint every N iterations (and at the end)", aliases=["--save_steps"])
    no_save_optim: bool = arg(False, "do not save the optimizer state")
    no_save_rng: bool = arg(False, "do not save RNG states")
    no_load_optim: bool = arg(False, "do not load the optimizer state when resuming")
    no_load_rng: bool = arg(False, "do not load RNG states when resuming")
    finetune: bool = arg(False, "load --load's weights only: iteration 0, fresh optimizer, data from the start")
    add_version: bool = arg(True, "put each run in a new vN-timestamp folder under --save")
    save_total_limit: int | None = arg(None, "keep at most N checkpoints (the latest is kept)")


@dataclass
class MegatronSftArguments(MegatronModelArguments, DataArguments, TemplateArguments, MegatronTrainArguments,
                           MegatronParallelArguments, MegatronCheckpointArguments):
    """`swiftray megatron sft`: supervised fine-tuning with megatron-core (TP, PP, EP, SP) on Ray."""

    def finalize(self) -> MegatronSftArguments:
        if not self.load and not self.model:
            raise ArgumentError("--load is required (a megatron-core folder from `swiftray export --model HF_DIR "
                                "--to_mcore true --output_dir X`, or an HF folder)")
        if self.load and self.model:
            raise ArgumentError("--load and --model are alternatives; pass one")
        self.load = self.load or self.model
        if not os.path.isdir(self.load):
            raise ArgumentError(f"--load {self.load}: no such folder")
        if not self.dataset:
            raise ArgumentError("--dataset is required")
        for name in ("micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
                     "log_interval", "save_interval"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.context_parallel_size != 1:
            raise ArgumentError(f"--context_parallel_size {self.context_parallel_size}: only 1 is supported")
        if self.recompute_granularity not in ("full", "selective", "none"):
            raise ArgumentError(f"--recompute_granularity {self.recompute_granularity!r}: expected full, selective or none")
        if self.recompute_method not in (None, "uniform", "block"):
            raise ArgumentError(f"--recompute_method {self.recompute_method!r}: expected uniform or block")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ArgumentError(f"--lr_decay_style {self.lr_decay_style!r}: expected cosine, linear or constant")
        if self.transformer_impl not in ("transformer_engine", "local"):
            raise ArgumentError(f"--transformer_impl {self.transformer_impl!r}: expected transformer_engine or local")
        if self.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ArgumentError(f"--moe_token_dispatcher_type {self.moe_token_dispatcher_type!r}: "
                                "expected alltoall or allgather")
        if self.padding_free:
            self.packing = True
        if self.data_seed is None:
            self.data_seed = self.seed
        if self.eval_interval is None:
            self.eval_interval = self.save_interval
        if self.report_to in (["none"], ["None"]):
            self.report_to = []
        nproc, nnodes = launch_world_size()
        self.world_size = nproc * nnodes
        self.node_rank = _node_rank(nnodes)
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.world_size % model_parallel:
            raise ArgumentError(f"{self.world_size} workers (NPROC_PER_NODE x NNODES) are not a multiple of "
                                f"--tensor_model_parallel_size x --pipeline_model_parallel_size = {model_parallel}")
        self.data_parallel_size = self.world_size // model_parallel
        _check_layout(self)
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step:
            raise ArgumentError(f"--global_batch_size {self.global_batch_size} is not a multiple of --micro_batch_size "
                                f"x data-parallel size = {self.micro_batch_size} x {self.data_parallel_size}")
        self.accumulation = self.global_batch_size // per_step
        if self.save is None:
            self.save = os.path.join("megatron_output", os.path.basename(os.path.normpath(self.load)))
        if self.max_length is not None and self.max_length < 8:
            raise ArgumentError(f"--max_length {self.max_length}: too small to hold a chat turn")
        return self

    def schedule(self, steps_per_epoch: int) -> tuple[int, int]:
        """(train_iters, warm-up iterations) once the data's size is known."""
        total = self.train_iters or max(1, steps_per_epoch * (self.max_epochs or 1))
        warmup = math.ceil(self.lr_warmup_fraction * total) if self.lr_warmup_fraction else self.lr_warmup_iters
        return total, warmup

    def explain_gpu_only(self, on_gpu: bool) -> None:
        """Say once what a GPU-only flag does on this run's CPU workers (on GPU they are honoured)."""
        if on_gpu:
            return
        for name, why in GPU_ONLY.items():
            if getattr(self, name):
                logger.info("--%s true: %s (CPU workers)", name, why)
        if self.moe_shared_expert_overlap:
            logger.info("--moe_shared_expert_overlap true: takes effect with shared experts only; "
                        "Qwen3 models have none")


def _check_layout(args: MegatronSftArguments) -> None:
    """The model and the world must take the parallel sizes: fail here, before Ray starts."""
    from swiftray.megatron.convert import model_shape_of
    from swiftray.megatron.model import Layout

    layout = Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                    ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size, sp=args.sequence_parallel)
    try:
        layout.check(args.world_size, model_shape_of(args.load))
    except (ValueError, FileNotFoundError) as err:
        raise ArgumentError(f"--load {args.load}: {err}") from None


def _node_rank(nnodes: int) -> int:
    raw = os.environ.get("NODE_RANK", "0").strip() or "0"
    if not raw.isdigit() or int(raw) >= nnodes:
        raise ArgumentError(f"environment variable NODE_RANK={raw!r}: expected 0..NNODES-1 (NNODES={nnodes})")
    return int(raw)
