"""DeepSpeed ZeRO-2 / ZeRO-3 (optionally with CPU offload), driven with torch's AdamW.

DeepSpeed's own Adam compiles a C++ op on first use; torch's AdamW needs no build and
runs on CPU. PolicyActor manages gradient accumulation and the LR schedule itself, so
the DeepSpeed config always says 1 micro-batch and 1 accumulation step, and the
engine is told by hand where the accumulation boundary is.

Checkpoints do not use DeepSpeed's own format (pickles, one file per rank): the fp32
master weights and Adam moments are gathered whole per parameter through DeepSpeed's
tensor-fragment API (`safe_get_full_*`), and restored into this rank's partition with
`safe_set_full_*`, whatever the number of ranks that saved them. A step whose gradient
norm is not finite is skipped by ZeRO's own overflow check (forced on for bf16 too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
import torch.distributed as dist

from .base import Backend, OptimizerFactory

logger = logging.getLogger(__name__)

_OFFLOAD = {"device": "cpu", "pin_memory": True}
PRESETS: dict[str, dict] = {
    "zero2": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "zero3": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
              "stage3_gather_16bit_weights_on_model_save": True},
    "zero2_offload": {"stage": 2, "contiguous_gradients": True, "offload_optimizer": _OFFLOAD},
    "zero3_offload": {"stage": 3, "contiguous_gradients": True, "offload_optimizer": _OFFLOAD,
                      "offload_param": _OFFLOAD, "stage3_gather_16bit_weights_on_model_save": True},
}
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def build_ds_config(spec: str, *, world_size: int, max_grad_norm: float, dtype: torch.dtype,
                    on_cpu: bool) -> dict:
    """A DeepSpeed config from a preset name (zero2, zero3, zero2_offload, zero3_offload) or a JSON path.

    From a JSON file, "optimizer" and "scheduler" sections are dropped (swiftray supplies
    both) and batch-size / clipping / precision fields are filled in, "auto" or not.
    """
    if spec in PRESETS:
        config: dict = {"zero_optimization": json.loads(json.dumps(PRESETS[spec]))}
    elif os.path.isfile(spec):
        with open(spec) as f:
            config = json.load(f)
        for section in ("optimizer", "scheduler"):
            if config.pop(section, None) is not None:
                logger.warning("%s: ignoring the %r section; swiftray uses torch AdamW and its own schedule",
                               spec, section)
    else:
        raise ValueError(f"deepspeed={spec!r}: expected one of {sorted(PRESETS)} or the path of a JSON file")
    if config.get("gradient_clipping") in (None, "auto"):
        config["gradient_clipping"] = max_grad_norm if max_grad_norm and max_grad_norm > 0 else 0.0
    config.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        train_batch_size=world_size,
        # Offload with a non-DeepSpeed optimizer is allowed, just slower than DeepSpeedCPUAdam.
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=2**31,
    )
    bf16 = config.get("bf16", {})
    if bf16.get("check_grad_overflow") is False:
        logger.warning("%s: ignoring bf16.check_grad_overflow=false; swiftray skips steps whose gradient "
                       "norm is not finite", spec)
    # ZeRO-1/2 skip a step with an inf/NaN gradient norm in bf16 only when this is on.
    config["bf16"] = {**bf16, "enabled": dtype == torch.bfloat16, "check_grad_overflow": True}
    config["fp16"] = {**config.get("fp16", {}), "enabled": dtype == torch.float16}
    if on_cpu:  # pinned memory needs an accelerator
        for key in ("offload_optimizer", "offload_param"):
            if key in config.get("zero_optimization", {}):
                config["zero_optimization"][key]["pin_memory"] = False
    return config


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, module: torch.nn.Module, make_optimizer: OptimizerFactory, *, max_grad_norm: float,
                 device: torch.device, ds_config: dict) -> None:
        import deepspeed
        import deepspeed.ops

        if device.type == "cpu":
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (~40 s) that only
            # its inference / tensor-parallel path uses; marking it incompatible skips the build.
            vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
        self.module = module
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.is_peft = hasattr(module, "peft_config")
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.stage not in (1, 2, 3):
            raise ValueError(f"deepspeed: zero_optimization.stage={self.stage}; swiftray drives ZeRO stages "
                             "1-3 (stage 0 is plain data parallelism: use the default ddp backend)")
        module.to(device)
        self.optimizer = make_optimizer(module)  # the torch AdamW; the LR schedule edits its groups
        # Names and group of each trainable parameter, before DeepSpeed swaps the groups' tensors.
        names = {id(p): name for name, p in module.named_parameters()}
        self.param_groups_names = [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
        self.model, _, _, _ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, config=ds_config, dist_init_required=False
        )
        self.engine = self.model

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()  # clips to gradient_clipping, steps, zeroes grads
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        if dist.get_rank() != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    # --- checkpoints: whole tensors per parameter name ------------------------------------------
    def trainable_names(self) -> list[str]:
        return [name for names in self.param_groups_names for name in names]

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable parameters in a fixed order (every rank must gather them in the same one)."""
        params = dict(self.module.named_parameters())
        return [(name, params[name]) for name in self.trainable_names()]

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 partitions, one per (sub)group: the tensors torch's AdamW keeps state for."""
        zero = self.engine.optimizer
        return list(zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups)

    def gather_train_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[dict]]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        rank0 = dist.get_rank() == 0
        states = [self.optimizer.state[f] for f in self._flat_partitions() if f in self.optimizer.state]
        if states:
            self._link_optimizer_state()
        step = states[0]["step"] if states else None
        weights, optim = {}, {}
        for name, param in self._trainable():  # collective per parameter (all-reduce / all-gather)
            weight = safe_get_full_fp32_param(param)
            moments = {key: safe_get_full_optimizer_state(param, key) for key in _ADAM_MOMENTS} if states else {}
            if rank0:
                weights[name] = weight.detach().cpu()
                if states:
                    optim[name] = {**{k: v.detach().cpu() for k, v in moments.items()},
                                   "step": torch.as_tensor(step, dtype=torch.float32).detach().cpu().clone()}
        if not rank0:
            return {}, {}, []
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
                  for g, names in zip(self.optimizer.param_groups, self.param_groups_names)]
        return weights, optim, groups

    def restore_train_state(self, weights: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]],
                            param_groups: list[dict], step: int) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if optim:
            self._ensure_optimizer_state()
        for name, param in self._trainable():  # local copies into this rank's partition
            safe_set_full_fp32_param(param, weights[name].float())
            for key in _ADAM_MOMENTS if optim else ():
                safe_set_full_optimizer_state(param, optim[name][key].float(), key)
        if optim:
            saved_step = float(next(iter(optim.values()))["step"])
            for flat in self._flat_partitions():
                self.optimizer.state[flat]["step"].fill_(saved_step)
        for group, saved in zip(self.optimizer.param_groups, param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._copy_master_to_model()
        self.engine.global_steps = step

    def _ensure_optimizer_state(self) -> None:
        """AdamW creates its state at the first step; a fresh engine needs it now to be loaded into."""
        for flat in self._flat_partitions():
            if "exp_avg" not in self.optimizer.state.get(flat, {}):
                self.optimizer.state[flat] = {"step": torch.zeros((), dtype=torch.float32, device=flat.device),
                                              **{k: torch.zeros_like(flat) for k in _ADAM_MOMENTS}}
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2 point each parameter's fragment at the optimizer state once, after the first step
        of group 0, when later groups have no state yet (DeepSpeed 0.19): link all groups again."""
        if self.stage != 3:
            zero = self.engine.optimizer
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _copy_master_to_model(self) -> None:
        """Collective: the fp32 master partitions into the (16-bit or fp32) model weights."""
        zero = self.engine.optimizer
        if self.stage != 3:
            zero.update_lp_params()
            return
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        if zero.persistent_parameters:  # small parameters ZeRO-3 keeps whole on every rank
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)

    def offload(self, model: bool = True, optimizer: bool = True) -> None:
        if self.device.type == "cpu" or not (model or optimizer):
            return
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as State

        include = ([State.lp_params, State.hp_params, State.lp_grads] if model else []) + (
            [State.optim_states] if optimizer else [])
        self.engine.offload_states(include=include)

    def onload(self) -> None:
        if self.device.type != "cpu":
            self.engine.reload_states()
