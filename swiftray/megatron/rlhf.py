"""`swiftray megatron rlhf --rlhf_type grpo`: the RL loop of `swiftray rlhf` with a Megatron policy.

Nothing of the loop is new: the run plan's policy role gets MegatronPolicyActor and its config
(`MegatronRlhfArguments.policy_trainer`, which build_plan asks for), and rollout, reference and
reward roles stay as they are. What this file adds is the command line: Megatron-SWIFT's GRPO
flags (ms-swift >= 3.11, `megatron rlhf`), which are `swiftray rlhf`'s RL flags plus Megatron's
parallel, model and schedule flags, in Megatron's vocabulary:

    --load                an HF folder, or a megatron-core folder (`swiftray export --to_mcore true`), which
                          is converted back to HF once for the rollout engines and the reference model
    --micro_batch_size    completions per data-parallel rank per micro-batch
    --global_batch_size   completions per optimizer step = micro x DP x accumulation (DP = ranks / (TP x PP))
    --steps_per_generation, --generation_batch_size, --num_generations   as ms-swift's GRPO (completions)
    --train_iters         RL steps (one generation each; unset: --num_train_epochs over the prompts)
    --lr, --min_lr, --lr_warmup_iters, --lr_decay_style, --clip_grad, --save, --save_interval, ...

Data: make_step_batch cuts each optimizer step into one shard per data-parallel rank; the plan
gives each Megatron rank its data-parallel rank (`RolePlan.data_ranks`, megatron-core's rank order
tp-cp-dp-pp), so that model-parallel peers take the same shard (ActorGroup.call_all_ranked).
Weight sync: rank 0 gathers the TP/EP/PP slices into HF names (MegatronPolicyActor.export_weights),
bucketed and versioned like any policy's.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftray.arguments import ArgumentError, RlhfArguments, arg
from swiftray.megatron.arguments import GPU_ONLY, MegatronParallelArguments, _node_rank
from swiftray.paths import absolute

logger = logging.getLogger("swiftray")
POLICY_ACTOR = "swiftray.actors.megatron_policy:MegatronPolicyActor"
# Megatron's name -> `swiftray rlhf`'s field it sets (when given).
RENAMED = {"lr": "learning_rate", "micro_batch_size": "per_device_train_batch_size", "train_iters": "max_steps",
           "clip_grad": "max_grad_norm", "lr_warmup_iters": "warmup_steps", "lr_decay_style": "lr_scheduler_type",
           "save": "output_dir", "save_interval": "save_steps", "log_interval": "logging_steps",
           "eval_interval": "eval_steps", "adam_eps": None}


@dataclass
class MegatronRlhfFlags:
    """Megatron-SWIFT's names for the model, schedule and memory flags of `megatron rlhf`."""

    load: str | None = arg(None, "the policy: an HF folder or a megatron-core folder (swiftray export --to_mcore "
                                 "true); unset: --model", aliases=["--mcore_model"])
    micro_batch_size: int | None = arg(None, "completions per data-parallel rank per micro-batch "
                                             "(--per_device_train_batch_size)", min=1)
    global_batch_size: int | None = arg(None, "completions per optimizer step: micro_batch_size x data-parallel "
                                              "size x accumulation; unset: --gradient_accumulation_steps, else 16",
                                        min=1)
    train_iters: int | None = arg(None, "RL steps, one generation each (--max_steps); unset: --num_train_epochs",
                                  min=1)
    lr: float | None = arg(None, "peak learning rate (--learning_rate); unset: 1e-5", gt=0)
    min_lr: float = arg(0.0, "learning rate floor of the decay", min=0.0)
    lr_warmup_iters: int | None = arg(None, "optimizer iterations of linear warm-up (--warmup_steps)", min=0)
    lr_decay_style: str | None = arg(None, "cosine | linear | constant (--lr_scheduler_type)",
                                     choices=("cosine", "linear", "constant"))
    clip_grad: float | None = arg(None, "gradient-norm clipping (--max_grad_norm)", min=0.0)
    adam_eps: float = arg(1e-8, "AdamW epsilon", gt=0.0)
    save: str | None = arg(None, "output folder (--output_dir); each run gets save/vN-YYYYMMDD-HHMMSS")
    save_interval: int | None = arg(None, "save every N RL steps (--save_steps)", min=1)
    log_interval: int | None = arg(None, "log every N RL steps (--logging_steps)", min=1)
    eval_interval: int | None = arg(None, "evaluate every N RL steps (--eval_steps)", min=1)
    recompute_granularity: str = arg("selective", "activation recomputation: full | selective | none",
                                     choices=("full", "selective", "none"))
    recompute_method: str | None = arg(None, "with full: uniform | block", choices=("uniform", "block"))
    recompute_num_layers: int | None = arg(None, "with full: layers per recomputed unit", min=1)
    recompute_modules: list[str] = arg(["core_attn"], "with selective: core_attn mlp moe ... to recompute")
    cross_entropy_loss_fusion: bool = arg(False, "fused vocab-parallel cross-entropy (GPU)")
    use_flash_attn: bool = arg(False, "flash attention (GPU with TransformerEngine)")


@dataclass
class MegatronRlhfArguments(RlhfArguments, MegatronParallelArguments, MegatronRlhfFlags):
    """`swiftray megatron rlhf --rlhf_type grpo`: RL with a megatron-core policy (TP, PP, EP, SP, DP)."""

    train_type: str = arg("full", "full (the Megatron backend trains full weights)", aliases=["--tuner_type"],
                          choices=("full",))

    def finalize(self) -> MegatronRlhfArguments:
        if not self.load and not self.model:
            raise ArgumentError("--load is required (an HF folder, or a megatron-core folder from `swiftray export "
                                "--model HF_DIR --to_mcore true --output_dir X`)")
        self.load = self.load or self.model
        if not os.path.isdir(self.load):
            raise ArgumentError(f"--load {self.load}: no such folder")
        from swiftray.megatron.convert import is_mcore_dir

        # The rollout engines and the reference model load HF weights: --model, else --load (converted
        # from megatron-core at the start of the run, see run_megatron_rlhf).
        self.load_is_mcore = is_mcore_dir(self.load)
        self.model = self.model or self.load
        for megatron_name, field_name in RENAMED.items():
            if field_name and getattr(self, megatron_name) is not None:
                setattr(self, field_name, getattr(self, megatron_name))
        if self.output_dir is None:  # Megatron-SWIFT's default folder
            self.output_dir = os.path.join("megatron_output", os.path.basename(os.path.normpath(self.load)))
        accumulation_unset = self.gradient_accumulation_steps is None
        self.gradient_accumulation_steps = self.gradient_accumulation_steps or 1  # set from DP below
        super().finalize()
        for name in ("deepspeed", "fsdp"):
            if getattr(self, name):
                raise ArgumentError(f"--{name}: the policy trains with megatron-core (its DDP and distributed "
                                    "optimizer); drop the flag")
        if self.adapters:
            raise ArgumentError("--adapters: the Megatron backend trains full weights; merge the adapter first "
                                "(swiftray export --merge_lora true)")
        if self.context_parallel_size != 1:
            raise ArgumentError(f"--context_parallel_size {self.context_parallel_size}: only 1 is supported")
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.world_size % model_parallel:
            raise ArgumentError(f"{self.world_size} workers (NPROC_PER_NODE x NNODES) are not a multiple of "
                                f"--tensor_model_parallel_size x --pipeline_model_parallel_size = {model_parallel}")
        self.data_parallel_size = self.world_size // model_parallel
        self.node_rank = _node_rank(int(os.environ.get("NNODES", "1") or 1))
        self._check_layout()
        per_step = self.per_device_train_batch_size * self.data_parallel_size
        if self.global_batch_size is not None:
            if self.global_batch_size % per_step:
                raise ArgumentError(f"--global_batch_size {self.global_batch_size} is not a multiple of "
                                    f"--micro_batch_size x data-parallel size = {per_step}")
            self.gradient_accumulation_steps = self.global_batch_size // per_step
        elif accumulation_unset:  # as --global_batch_size 16 (Megatron's default), at least one round
            self.gradient_accumulation_steps = max(1, math.ceil(16 / per_step))
        return self

    def _check_layout(self) -> None:
        """The model and the world must take the parallel sizes: fail here, before Ray starts."""
        from swiftray.megatron.convert import model_shape_of

        try:
            self.layout().check(self.world_size, model_shape_of(self.load))
        except (ValueError, FileNotFoundError) as err:
            raise ArgumentError(f"--load {self.load}: {err}") from None

    def layout(self) -> Any:
        from swiftray.megatron.model import Layout

        return Layout(tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
                      ep=self.expert_model_parallel_size, etp=self.expert_tensor_parallel_size,
                      sp=self.sequence_parallel)

    def data_ranks(self) -> tuple[int, ...]:
        """Each rank's data-parallel rank in megatron-core's default order (tp-cp-dp-pp, CP = 1): TP peers
        are adjacent ranks, pipeline stages the slowest axis."""
        tp = self.tensor_model_parallel_size
        return tuple((rank // tp) % self.data_parallel_size for rank in range(self.world_size))

    def policy_trainer(self, dtype: str, total_optimizer_steps: int, algorithm: Any) -> tuple[str, Any, tuple]:
        """The run plan's policy role: (actor, config, data shard of each rank); build_plan calls it."""
        from swiftray.actors.megatron_policy import MegatronPolicyConfig
        from swiftray.megatron.convert import model_shape_of

        if algorithm.policy_head != "lm":
            raise ArgumentError(f"--rlhf_type {self.rlhf_type}: trains a {algorithm.policy_head} head; the Megatron "
                                "backend trains language-model policies")
        for spec in algorithm.role_specs:
            if "train" in spec.phases or spec.scale == "per_rank":
                raise ArgumentError(f"--rlhf_type {self.rlhf_type}: its {spec.name} role trains beside the policy "
                                    "on the policy's ranks, which the Megatron backend does not arrange yet")
        aux = self.moe_aux_loss_coeff
        if aux is None:  # as Megatron-SWIFT: the model's own coefficient
            aux = model_shape_of(self.load).router_aux_loss_coef
        warmup = self.warmup_steps or math.ceil(self.warmup_ratio * total_optimizer_steps)
        config = MegatronPolicyConfig(
            model_dir=absolute(self.load), torch_dtype=dtype, seed=self.seed,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size, sequence_parallel=self.sequence_parallel,
            transformer_impl="auto" if self.transformer_impl == "transformer_engine" else "local",
            use_distributed_optimizer=self.use_distributed_optimizer, moe_aux_loss_coeff=aux,
            moe_grouped_gemm=self.moe_grouped_gemm, moe_shared_expert_overlap=self.moe_shared_expert_overlap,
            moe_token_dispatcher_type=self.moe_token_dispatcher_type,
            moe_router_load_balancing_type=self.moe_router_load_balancing_type,
            recompute_granularity=None if self.recompute_granularity == "none" else self.recompute_granularity,
            recompute_method=self.recompute_method, recompute_num_layers=self.recompute_num_layers,
            recompute_modules=list(self.recompute_modules), cross_entropy_loss_fusion=self.cross_entropy_loss_fusion,
            use_flash_attn=self.use_flash_attn, learning_rate=self.learning_rate, min_lr=self.min_lr,
            weight_decay=self.weight_decay, adam_betas=(self.adam_beta1, self.adam_beta2), adam_epsilon=self.adam_eps,
            lr_scheduler_type=self.lr_scheduler_type, warmup_steps=warmup, total_steps=max(1, total_optimizer_steps),
            max_grad_norm=self.max_grad_norm)
        return POLICY_ACTOR, config, self.data_ranks()


def hf_folder_for_rollouts(args: MegatronRlhfArguments) -> str:
    """An HF folder of --load's weights for the rollout engines and the reference model: --model when it
    was given, --load when it is one; a megatron-core --load is converted once, beside the runs."""
    if not (args.load_is_mcore and os.path.samefile(args.model, args.load)):
        return args.model
    from swiftray.megatron.convert import mcore_to_hf

    out = Path(args.output_dir) / f"{Path(args.load).name}-hf"
    if not (out / "config.json").is_file():
        logger.info("converting %s (megatron-core) to %s (HF) for the rollout engines and the reference", args.load,
                    out)
        mcore_to_hf(args.load, out)
    return str(out)


def run_megatron_rlhf(args: MegatronRlhfArguments) -> Path | None:
    """Train; the run folder (None with --print_plan)."""
    from swiftray.controller import run_rlhf
    from swiftray.controller.common import planning_cluster

    if not args.print_plan:
        args.model = hf_folder_for_rollouts(args)
        if planning_cluster(args).gpus == 0:
            for name, why in GPU_ONLY.items():
                if getattr(args, name, False):
                    logger.info("--%s true: %s (CPU workers)", name, why)
    return run_rlhf(args)
