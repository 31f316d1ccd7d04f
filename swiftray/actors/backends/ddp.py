"""DDP: every rank holds the whole model; gradients are all-reduced during backward."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .base import Backend


class DDPBackend(Backend):
    name = "ddp"

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if dist.get_world_size() == 1:  # nothing to all-reduce; DDP would still copy every grad into buckets
            return module
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        # no_sync must cover the forward too: DDP decides at forward time whether to reduce.
        if is_last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()
