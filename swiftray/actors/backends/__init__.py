"""Training backends for PolicyActor: ddp, fsdp2, deepspeed (ZeRO-2/3)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .base import Backend, OptimizerFactory, adamw_factory

BACKENDS = ("ddp", "fsdp2", "deepspeed")

__all__ = ["BACKENDS", "Backend", "adamw_factory", "make_backend"]


def make_backend(name: str, module: torch.nn.Module, make_optimizer: OptimizerFactory, *,
                 max_grad_norm: float, device: torch.device, deepspeed: str = "zero2",
                 fsdp_reshard_after_forward: bool = True, fsdp_offload: bool = False) -> Backend:
    """Wrap `module` for training on this rank; the process group must already exist."""
    if name == "ddp":
        from .ddp import DDPBackend

        return DDPBackend(module, make_optimizer, max_grad_norm=max_grad_norm, device=device)
    if name == "fsdp2":
        from .fsdp import FSDP2Backend

        return FSDP2Backend(module, make_optimizer, max_grad_norm=max_grad_norm, device=device,
                            reshard_after_forward=fsdp_reshard_after_forward, offload=fsdp_offload)
    if name == "deepspeed":
        if device.type == "cpu":
            # DeepSpeed picks its accelerator at import; on a CPU-only rank it must be "cpu".
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from .deepspeed import DeepSpeedBackend, build_ds_config

        dtype = next(module.parameters()).dtype
        config = build_ds_config(deepspeed, world_size=dist.get_world_size(), max_grad_norm=max_grad_norm,
                                 dtype=dtype, on_cpu=device.type == "cpu")
        return DeepSpeedBackend(module, make_optimizer, max_grad_norm=max_grad_norm, device=device,
                                ds_config=config)
    if name == "megatron":
        raise NotImplementedError("backend 'megatron' needs CUDA GPUs and is not implemented yet")
    raise ValueError(f"backend={name!r}: expected one of {BACKENDS}")
