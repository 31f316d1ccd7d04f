"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Each transformer block (the model's `_no_split_modules` classes) is its own shard
unit, so only one block is gathered at a time; the root holds embeddings and head.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .base import Backend


class FSDP2Backend(Backend):
    name = "fsdp2"

    def __init__(self, *args, reshard_after_forward: bool = True, offload: bool = False, **kwargs) -> None:
        # full_shard frees each block's gathered weights after its forward; shard_grad_op keeps them
        # until backward (more memory, one all-gather less). offload keeps parameters and optimizer
        # state in CPU memory (needs an accelerator: FSDP2's CPUOffloadPolicy does not run on CPU).
        self.reshard_after_forward = reshard_after_forward
        self.offload_policy = None
        if offload:
            from torch.distributed.fsdp import CPUOffloadPolicy

            self.offload_policy = CPUOffloadPolicy()
        super().__init__(*args, **kwargs)

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        block_names = set(getattr(module, "_no_split_modules", None) or ())
        blocks = [m for m in module.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise ValueError(
                f"fsdp2: {type(module).__name__} names no transformer block class (_no_split_modules); "
                "cannot choose shard units"
            )
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.offload_policy is not None:
            options["offload_policy"] = self.offload_policy
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(module, **options)
        return module

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        # Without sync, FSDP2 keeps accumulating unsharded grads and reduce-scatters them once.
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()
