"""MegatronPolicyActor: one rank of a megatron-core policy (TP x PP x EP x DP), with PolicyActor's calls.

The driver runs it exactly as it runs PolicyActor (`setup`, `train_step`, `eval_step`,
`compute_logprobs`, `save_checkpoint`, `load_checkpoint`, `export_weights`, `offload`,
`onload`, same arguments, same returns, same `loss_fn` contract). What differs is inside:

- ranks form megatron-core's parallel groups (`swiftray/megatron/model.py`); each holds its
  pipeline stage, its experts and its tensor-parallel slices, loaded from an HF or
  megatron-core folder (`sharding.py`);
- a step runs megatron-core's pipeline schedule over the micro-batches, its DDP (gradient
  buffers, reduce-scatter over data parallel ranks) and its DistributedOptimizer;
- token log-probs come from the vocab-parallel log-softmax, equal to the unsplit ones.

Data: ranks of one model-parallel group (same data-parallel rank) must get the same
micro-batches. `layout()` gives each rank's data-parallel rank; `dp_shards` expands one shard
per data-parallel rank into one argument per rank for `ActorGroup.call_all_ranked`.

Loss scaling: loss_fn's losses are summands of the global loss (PolicyActor's contract), so
the gradient must be their plain sum over micro-batches and data-parallel ranks. megatron's
schedule divides each micro-batch's loss by the number of micro-batches and its DDP averages
over data-parallel ranks; the loss handed back is multiplied by both to undo that. MoE
auxiliary losses keep megatron's own scaling (a mean over micro-batches and ranks).

On a machine without CUDA the CPU shim (`swiftray/megatron/cpu_shim.py`) is installed first.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from swiftray.actors.group import DistributedWorker
from swiftray.actors.policy import cast_for_engines
from swiftray.megatron import cpu_shim

LossFn = Callable[[torch.Tensor, dict, int], tuple[torch.Tensor, dict]]
LR_STYLES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class MegatronPolicyConfig:
    """Everything `MegatronPolicyActor.setup` accepts: PolicyConfig's names where the meaning is the
    same, Megatron-SWIFT's for the rest."""

    model_dir: str  # an HF folder or a megatron-core folder (swiftray export --to_mcore)
    torch_dtype: str = "float32"
    seed: int = 42
    train_type: str = "full"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    transformer_impl: str = "auto"  # auto (TransformerEngine on GPU when installed) | local | transformer_engine
    use_distributed_optimizer: bool = True
    moe_aux_loss_coeff: float = 0.0
    moe_grouped_gemm: bool = False
    moe_shared_expert_overlap: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    moe_router_load_balancing_type: str = "aux_loss"
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] = dataclasses.field(default_factory=lambda: ["core_attn"])
    cross_entropy_loss_fusion: bool = False
    use_flash_attn: bool = False
    learning_rate: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    lr_decay_steps: int | None = None  # unset: total_steps
    total_steps: int = 1
    max_grad_norm: float = 1.0  # <= 0: no clipping
    backend: str = "megatron"  # what --print_plan names the policy's trainer
    engine_dtype: str | None = None  # the rollout engines' dtype when it differs (--rollout_dtype): cast before sending

    def describe(self, world_size: int) -> str:
        """The parallel layout of `world_size` ranks, for --print_plan."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        extra = [f"EP {self.expert_model_parallel_size}"] if self.expert_model_parallel_size > 1 else []
        extra += ["sequence parallel"] if self.sequence_parallel else []
        extra += ["distributed optimizer"] if self.use_distributed_optimizer else []
        return (f"megatron-core: {world_size} ranks = TP {tp} x PP {pp} x DP {world_size // (tp * pp)}"
                + (f" ({', '.join(extra)})" if extra else ""))

    @classmethod
    def from_dict(cls, config: dict | MegatronPolicyConfig) -> MegatronPolicyConfig:
        if isinstance(config, MegatronPolicyConfig):  # a run plan's RolePlan.config
            config = dataclasses.asdict(config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"MegatronPolicyActor.setup: unknown config field(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**config)
        if cfg.train_type != "full":
            raise ValueError(f"MegatronPolicyActor.setup: train_type={cfg.train_type!r}; the Megatron backend "
                             "trains full weights only")
        if cfg.lr_scheduler_type == "constant_with_warmup":
            cfg.lr_scheduler_type = "constant"
        if cfg.lr_scheduler_type not in LR_STYLES:
            raise ValueError(f"MegatronPolicyActor.setup: lr_scheduler_type={cfg.lr_scheduler_type!r}, "
                             f"expected one of {LR_STYLES}")
        if cfg.total_steps < 1:
            raise ValueError(f"MegatronPolicyActor.setup: total_steps={cfg.total_steps}, must be >= 1")
        cfg.adam_betas = tuple(cfg.adam_betas)
        return cfg


def _fetch(item: Any) -> Any:
    return ray.get(item) if isinstance(item, ray.ObjectRef) else item


def dp_shards(shards: list, dp_ranks: list[int]) -> list:
    """One argument per rank from one shard per data-parallel rank (`layout()["dp_rank"]` of each rank)."""
    return [shards[r] for r in dp_ranks]


class MegatronPolicyActor(DistributedWorker):
    """One rank of a Megatron policy group. Call `setup(config)` on every rank first."""

    def __init__(self) -> None:
        self.model = None
        cpu_shim.install()  # before megatron.core is imported, and only without CUDA

    # --- construction --------------------------------------------------------------------
    def setup(self, config: dict | MegatronPolicyConfig) -> dict:
        """Arrange the parallel groups, build and load this rank's model, DDP, optimizer and schedule."""
        with cpu_shim.device_mode():
            return self._setup(MegatronPolicyConfig.from_dict(config))

    def _setup(self, cfg: MegatronPolicyConfig) -> dict:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from swiftray.megatron import convert, model, sharding

        self.cfg = cfg
        _ensure_process_group()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._teardown()
        reader = convert.CanonicalReader(cfg.model_dir)
        self.shape = reader.shape
        self.layout_ = model.Layout(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size,
                                    ep=cfg.expert_model_parallel_size, etp=cfg.expert_tensor_parallel_size,
                                    sp=cfg.sequence_parallel)
        self.layout_.check(self.world_size, self.shape)
        model.portable_tensor_pickles()
        model.init_parallel(self.layout_)
        if cpu_shim.active():
            cpu_shim.install_megatron_patches()
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model_parallel_cuda_manual_seed(cfg.seed)
        use_te = _use_transformer_engine(cfg.transformer_impl)
        opts = model.BuildOptions(
            dtype=cfg.torch_dtype, use_te=use_te,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, moe_grouped_gemm=cfg.moe_grouped_gemm and use_te,
            moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
            moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
            moe_shared_expert_overlap=cfg.moe_shared_expert_overlap,
            recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
            recompute_num_layers=cfg.recompute_num_layers, recompute_modules=tuple(cfg.recompute_modules),
            use_flash_attn=cfg.use_flash_attn and use_te, fusions=torch.cuda.is_available(),
        )
        self.tf_config = model.transformer_config(self.shape, self.layout_, opts)
        self.model = model.build_model(self.shape, self.tf_config, use_te=use_te)
        first_layer, _ = model.stage_layers(self.tf_config)
        self.pieces = sharding.pieces(self.model, self.shape, first_layer)
        sharding.load_weights(self.model, self.pieces, reader.get)
        self._build_training()
        self.global_step = 0
        self._hf_fused_experts: bool | None = None
        from swiftray.megatron.hf_map import canonical_names, canonical_shape

        total = sum(int(np.prod(canonical_shape(self.shape, n))) for n in canonical_names(self.shape))
        return {"num_params": total, "num_trainable_params": total}

    def _build_training(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg, dtype = self.cfg, self.tf_config.params_dtype
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer, average_in_collective=False)
        self.ddp = DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=self.model)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=cfg.learning_rate, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1], adam_eps=cfg.adam_epsilon,
            clip_grad=max(0.0, cfg.max_grad_norm), bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            params_dtype=dtype, use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp], use_gloo_process_groups=False)
        decay = cfg.lr_decay_steps or cfg.total_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.learning_rate, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=max(decay, cfg.warmup_steps + 1),
            lr_decay_style=cfg.lr_scheduler_type, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=decay, wd_incr_style="constant")
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.grad_scale_func = self.optimizer.scale_loss

    def _teardown(self) -> None:
        """Free a previous setup's model and optimizer before building the next."""
        if self.model is None:
            return
        self.model = self.ddp = self.optimizer = self.scheduler = None
        gc.collect()

    def layout(self) -> dict[str, int]:
        """This rank's coordinates in the parallel groups (the driver picks each rank's data by dp_rank)."""
        from megatron.core import parallel_state as ps

        return {"rank": self.rank, "dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(),
                "tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
                "ep_rank": ps.get_expert_model_parallel_rank()}

    def _layout_record(self) -> dict[str, Any]:
        return {"world_size": self.world_size, **dataclasses.asdict(self.layout_),
                "distributed_optimizer": self.cfg.use_distributed_optimizer}

    # --- training and evaluation ----------------------------------------------------------
    def train_step(self, micro_batches: list | ray.ObjectRef, loss_fn: LossFn,
                   with_entropy: bool = False) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; global metrics as PolicyActor.train_step."""
        with cpu_shim.device_mode():
            batches = self._fetch_batches(micro_batches)
            num_tokens = self._global_num_tokens(batches)
            self.ddp.train()
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            lr = self.optimizer.param_groups[0]["lr"]
            stats = self._run(batches, loss_fn, num_tokens, with_entropy=with_entropy, forward_only=False)
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.global_step += 1
            out = self._reduce(stats, len(batches), num_tokens)
            return {**out, "num_tokens": num_tokens, "grad_norm": float(grad_norm or 0.0), "lr": lr}

    @torch.no_grad()
    def eval_step(self, micro_batches: list | ray.ObjectRef, loss_fn: LossFn) -> dict[str, float]:
        """Loss and token accuracy over this rank's micro-batches, reduced over ranks; no update."""
        with cpu_shim.device_mode():
            batches = self._fetch_batches(micro_batches)
            num_tokens = self._global_num_tokens(batches)
            self.ddp.eval()
            stats = self._run(batches, loss_fn, num_tokens, forward_only=True)
            return {**self._reduce(stats, len(batches), num_tokens), "num_tokens": num_tokens}

    @torch.no_grad()
    def compute_logprobs(self, batch: dict | list | ray.ObjectRef) -> torch.Tensor | list[torch.Tensor]:
        """Token log-probs [B, T-1] on CPU (zero where labels are -100), on every rank of the group."""
        with cpu_shim.device_mode():
            batch = _fetch(batch)
            batches = self._fetch_batches(batch if isinstance(batch, list) else [batch])
            self.ddp.eval()
            stats = self._run(batches, None, 0, forward_only=True, keep_logprobs=True)
            logprobs = self._from_last_stage(stats["logprobs"], batches)
            return logprobs if isinstance(batch, list) else logprobs[0]

    @torch.no_grad()
    def annotate(self, batch: Any, forward_batch_size: int = 64) -> Any:
        """Collective: this data-parallel rank's slice of the rollouts (a RolloutBatch) with
        `annotations["logprobs"]`, each completion token's log-prob under the current weights
        (PolicyActor.annotate's contract; every rank of the group takes part)."""
        from swiftray.experience import sequences_batch, tokens_to_completion_values

        batch = _fetch(batch)
        values: list[list[float]] = []
        for start in range(0, len(batch), forward_batch_size):
            prompts = batch.prompt_ids[start:start + forward_batch_size]
            completions = batch.completion_ids[start:start + forward_batch_size]
            logprobs = self.compute_logprobs(sequences_batch(prompts, completions, pad_token_id=0))
            values += tokens_to_completion_values(logprobs, [len(p) for p in prompts], [len(c) for c in completions])
        batch.annotations["logprobs"] = values
        return batch

    def _run(self, batches: list[dict], loss_fn: LossFn | None, num_tokens: int, *, forward_only: bool,
             with_entropy: bool = False, keep_logprobs: bool = False) -> dict[str, Any]:
        """megatron-core's schedule over the micro-batches; what the last stage saw, in `stats`."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from swiftray.megatron.batch import loss_labels, model_inputs

        pad = self.layout_.tp if self.layout_.sp else 1
        device = _device()
        flash = self.tf_config.attention_backend.name == "flash"
        items = []
        for b in batches:
            b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            inputs = {k: v.to(device) for k, v in model_inputs(b, pad_to_multiple=pad).items()}
            if flash:  # flash attention takes no mask: causal only, which right padding needs no more than
                mask = b.get("attention_mask")
                if b.get("position_ids") is not None or (mask is not None and mask.dim() == 4):
                    raise ValueError("MegatronPolicyActor: flash attention with packed rows needs megatron-core's "
                                     "THD layout (packed_seq_params), not built here; set use_flash_attn False")
                inputs["attention_mask"] = None
            items.append((inputs, b, loss_labels(b)))
        stats: dict[str, Any] = {"loss": 0.0, "correct": 0, "extra": {}, "logprobs": []}
        scale = len(batches) * ps.get_data_parallel_world_size()
        step = partial(self._forward_step, loss_fn=loss_fn, num_tokens=num_tokens, stats=stats, scale=scale,
                       with_entropy=with_entropy, keep_logprobs=keep_logprobs)
        widest = max(it[0]["input_ids"].shape[1] for it in items)
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(items), model=[self.ddp], num_microbatches=len(items),
            seq_length=widest, micro_batch_size=items[0][0]["input_ids"].shape[0], forward_only=forward_only)
        return stats

    def _forward_step(self, data_iterator, model, *, loss_fn, num_tokens, stats, scale, with_entropy, keep_logprobs):
        inputs, batch, labels = next(data_iterator)
        output = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       attention_mask=inputs["attention_mask"])
        return output, partial(self._loss, batch=batch, labels=labels, loss_fn=loss_fn, num_tokens=num_tokens,
                               stats=stats, scale=scale, with_entropy=with_entropy, keep_logprobs=keep_logprobs)

    def _loss(self, logits, *, batch, labels, loss_fn, num_tokens, stats, scale, with_entropy, keep_logprobs):
        """On the last stage: token log-probs, loss_fn, and the loss megatron back-propagates."""
        from megatron.core import parallel_state as ps

        from swiftray.megatron.batch import token_entropy, token_logprobs

        tp_group = ps.get_tensor_model_parallel_group()
        fused = self.cfg.cross_entropy_loss_fusion and torch.cuda.is_available()
        logprobs, mask, correct = token_logprobs(logits, labels, tp_group, fused=fused)
        if keep_logprobs:
            stats["logprobs"].append(logprobs.detach().cpu())
        if loss_fn is None:
            return logits.sum() * 0.0, {}
        batch = {**batch, "loss_mask": mask}
        if with_entropy:
            batch["entropies"] = token_entropy(logits, labels, tp_group)
        loss, metrics = loss_fn(logprobs, batch, num_tokens)
        stats["loss"] += float(loss.detach())
        stats["correct"] += int(correct)
        for key, value in (metrics or {}).items():
            stats["extra"][key] = stats["extra"].get(key, 0.0) + float(value)
        return loss * scale, {"loss": loss.detach().clone()}

    def _fetch_batches(self, micro_batches: list | ray.ObjectRef) -> list[dict]:
        if self.model is None:
            raise RuntimeError("MegatronPolicyActor: call setup(config) on every rank first")
        batches = [_fetch(b) for b in _fetch(micro_batches)]
        if not batches:
            raise ValueError("MegatronPolicyActor: got an empty list of micro-batches")
        for i, batch in enumerate(batches):
            if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
                keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
                raise ValueError(f"MegatronPolicyActor: micro-batch {i} must be a dict with an 'input_ids' "
                                 f"tensor [B, T], got {keys}")
        return batches

    def _global_num_tokens(self, batches: list[dict]) -> int:
        """Loss tokens over the data-parallel ranks (model-parallel peers hold the same data); also checks
        that every rank has as many micro-batches (the schedule's collectives would hang otherwise)."""
        from megatron.core import parallel_state as ps

        local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches if "labels" in b)
        tokens = torch.tensor([local], dtype=torch.float64, device=_device())
        counts = torch.tensor([len(batches), -len(batches)], dtype=torch.float64, device=_device())
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if counts[0] != -counts[1]:
            raise ValueError(f"MegatronPolicyActor: ranks got different numbers of micro-batches "
                             f"({int(-counts[1])}..{int(counts[0])}); every rank needs the same number")
        return int(tokens.item())

    def _reduce(self, stats: dict[str, Any], num_micro: int, num_tokens: int) -> dict[str, float]:
        """Sum loss and hits over data-parallel ranks (counted once per model-parallel group: the last
        stage's TP rank 0); average loss_fn's metrics over data-parallel ranks x micro-batches."""
        from megatron.core import parallel_state as ps

        from swiftray.megatron.sharding import all_gather_json

        counts = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        keys = sorted({k for ks in all_gather_json(sorted(stats["extra"])) for k in ks})
        row = [stats["loss"], stats["correct"]] + [stats["extra"].get(k, 0.0) for k in keys]
        values = torch.tensor(row if counts else [0.0] * len(row), dtype=torch.float64, device=_device())
        dist.all_reduce(values)
        out = {"loss": values[0].item(), "token_acc": values[1].item() / max(1, num_tokens)}
        dp = ps.get_data_parallel_world_size()
        out.update({k: values[2 + i].item() / (num_micro * dp) for i, k in enumerate(keys)})
        return out

    def _from_last_stage(self, logprobs: list[torch.Tensor], batches: list[dict]) -> list[torch.Tensor]:
        """The last pipeline stage's log-probs, on every stage."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return logprobs
        if not ps.is_pipeline_last_stage():
            logprobs = [torch.zeros(b["input_ids"].shape[0], b["input_ids"].shape[1] - 1) for b in batches]
        group = ps.get_pipeline_model_parallel_group()
        src = ps.get_pipeline_model_parallel_last_rank()
        out = []
        for lp in logprobs:
            lp = lp.to(_device()).contiguous()
            dist.broadcast(lp, src=src, group=group)
            out.append(lp.cpu())
        return out

    # --- checkpoints and weights -------------------------------------------------------------
    def save_checkpoint(self, path: str, save_only_model: bool = False, save_optim: bool = True,
                        save_rng: bool = True) -> str:
        """Rank 0 writes the whole model as a megatron-core folder (any layout can load it); unless
        save_only_model, every rank adds its optimizer shard, schedule and RNG (see train_state.py)."""
        from swiftray.megatron import convert, sharding, train_state
        from swiftray.megatron.hf_map import canonical_names

        with cpu_shim.device_mode():
            full = sharding.gather_full(self.model, self.pieces)
            if self.rank == 0:
                os.makedirs(path, exist_ok=True)
                names = [n for n in canonical_names(self.shape) if n in full]
                convert.write_mcore_dir(path, ((n, full[n]) for n in names), source=self.cfg.model_dir,
                                        extra={"iteration": self.global_step})
            del full
            dist.barrier()
            if not save_only_model:
                train_state.save(Path(path) / "train_state", self.rank, optimizer=self.optimizer,
                                 scheduler=self.scheduler, step=self.global_step, layout=self._layout_record(),
                                 save_optim=save_optim, save_rng=save_rng)
            dist.barrier()
            return path

    def load_checkpoint(self, path: str, load_optim: bool = True, load_rng: bool = True) -> int:
        """Restore weights, optimizer shard, schedule and RNG from save_checkpoint(path); returns the step."""
        from swiftray.megatron import convert, sharding, train_state

        with cpu_shim.device_mode():
            state = Path(path) / "train_state"
            if not (state / f"rank_{self.rank}.json").is_file():
                raise FileNotFoundError(f"{path}: no training state for rank {self.rank} (saved with "
                                        "save_only_model, or by fewer ranks); load it as a model instead")
            reader = convert.CanonicalReader(path)
            sharding.load_weights(self.model, self.pieces, reader.get)
            self.global_step = train_state.load(state, self.rank, optimizer=self.optimizer, scheduler=self.scheduler,
                                                layout=self._layout_record(), load_optim=load_optim,
                                                load_rng=load_rng)
            dist.barrier()
            return self.global_step

    def export_weights(self, bucket_bytes: int = 64 << 20, merge_lora: bool = True,
                       shared_memory: bool = False) -> list[ray.ObjectRef] | list[dict]:
        """Full weights in HF names (a live transformers model's state_dict names) for rollout engines,
        gathered over TP/EP/PP to rank 0 (collective; other ranks return []). As PolicyActor's: rank 0
        returns ObjectRefs of CPU tensor buckets of about bucket_bytes each, or with shared_memory
        (engines on this node) [handle] of one of its two shared-memory buffers (shared_weights.py),
        falling back to the object store without room in /dev/shm. merge_lora: full weights only here."""
        from swiftray.actors import shared_weights

        named = self._engine_state()
        if named is None:
            return []
        if shared_memory and shared_weights.available() and getattr(self, "_shared_writer", None) is not False:
            if getattr(self, "_shared_writer", None) is None:
                self._shared_writer = shared_weights.SharedWeightsWriter()
            try:
                return [self._shared_writer.write(named)]
            except MemoryError as err:
                logging.getLogger("swiftray").warning("%s; syncing weights through the object store", err)
                self._shared_writer.close()
                self._shared_writer = False
        buckets: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in named.items():
            if size >= bucket_bytes:
                buckets.append({})
                size = 0
            buckets[-1][name] = tensor
            size += tensor.numel() * tensor.element_size()
        return [ray.put(bucket) for bucket in buckets if bucket]

    def _engine_state(self) -> dict[str, torch.Tensor] | None:
        """Collective: the HF-named CPU tensors engines load, on rank 0 (None elsewhere)."""
        from swiftray.megatron import hf_map, sharding

        with cpu_shim.device_mode():
            full = sharding.gather_full(self.model, self.pieces)
        if self.rank != 0:
            return None
        named = hf_map.fuse_experts_for_runtime(hf_map.canonical_to_hf(full.__getitem__, self.shape), self.shape,
                                                fused=self._runtime_experts_fused())
        return cast_for_engines({name: tensor.detach().cpu().contiguous() for name, tensor in named},
                                self.cfg.engine_dtype)

    def join_weight_group(self, master_addr: str, master_port: int, size: int, backend: str, epoch: int) -> None:
        """Rank 0: open the weight-broadcast group to engines on other nodes (collective_sync.py)."""
        from swiftray.actors.collective_sync import WeightBroadcast

        listen, self._store_socket = getattr(self, "_store_socket", None), None
        self._weight_group = None  # a previous group's sockets go first
        self._weight_group = WeightBroadcast(master_addr, master_port, 0, size, backend, epoch, listen_socket=listen)

    def broadcast_weights(self, version: int, bucket_bytes: int = 64 << 20) -> int:
        """Collective over the Megatron ranks: rank 0 broadcasts the gathered HF-named weights to its
        weight-broadcast group's engines; returns the bytes sent (0 on other ranks)."""
        state = self._engine_state()
        if state is None:
            return 0
        if getattr(self, "_weight_group", None) is None:
            raise RuntimeError("MegatronPolicyActor.broadcast_weights: join_weight_group first")
        return self._weight_group.send(state, version, bucket_bytes)

    def _runtime_experts_fused(self) -> bool:
        """Whether this transformers version keeps a layer's experts as fused 3D parameters."""
        if not self.shape.is_moe:
            return False
        if self._hf_fused_experts is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.cfg.model_dir)
            config.num_hidden_layers = 1
            with torch.device("meta"):
                names = AutoModelForCausalLM.from_config(config).state_dict()
            self._hf_fused_experts = any(n.endswith("mlp.experts.gate_up_proj") for n in names)
        return self._hf_fused_experts

    def offload(self, model: bool = True, optimizer: bool = True, gc_collect: bool = False) -> None:
        """Colocated mode, while engines generate: move the optimizer moments off the GPU (--offload_optimizer;
        the weights stay: megatron's DDP buffers alias them); a no-op on CPU."""
        if optimizer:
            self._move_optimizer_state(torch.device("cpu"))
        if gc_collect:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def onload(self) -> None:
        self._move_optimizer_state(_device())

    def _move_optimizer_state(self, device: torch.device) -> None:
        if not torch.cuda.is_available():
            return
        from swiftray.megatron.train_state import inner_optimizers

        for inner in inner_optimizers(self.optimizer):
            for state in inner.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        state[key] = value.to(device, non_blocking=True)
        torch.cuda.synchronize()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _use_transformer_engine(impl: str) -> bool:
    if impl == "local" or not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if impl == "transformer_engine":
            raise RuntimeError("transformer_impl=transformer_engine needs TransformerEngine installed") from None
        return False
    return True


def _ensure_process_group() -> None:
    """Outside an ActorGroup (a plain process), act as a group of one."""
    if dist.is_initialized():
        return
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
