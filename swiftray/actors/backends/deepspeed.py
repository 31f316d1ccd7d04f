"""DeepSpeed ZeRO-2 / ZeRO-3 (optionally with CPU offload), driven with torch's AdamW.

DeepSpeed's own Adam compiles a C++ op on first use; torch's AdamW needs no build and
runs on CPU. PolicyActor manages gradient accumulation and the LR schedule itself, so
the DeepSpeed config always says 1 micro-batch and 1 accumulation step, and the
engine is told by hand where the accumulation boundary is.
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
_CHECKPOINT_TAG = "state"


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
    config["bf16"] = {**config.get("bf16", {}), "enabled": dtype == torch.bfloat16}
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
        module.to(device)
        self.optimizer = make_optimizer(module)  # the torch AdamW; the LR schedule edits its groups
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

    def save_train_state(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag=_CHECKPOINT_TAG, save_latest=False,
                                    exclude_frozen_parameters=self.is_peft)

    def load_train_state(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(
            path, tag=_CHECKPOINT_TAG, load_module_strict=not self.is_peft, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag {_CHECKPOINT_TAG!r}) to resume from")

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
