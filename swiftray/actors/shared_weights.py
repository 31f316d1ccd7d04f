"""Same-node weight sync through one shared-memory buffer: the policy writes it, rollouts read it.

The object-store path (`ray.put` of tensor buckets) pickles every tensor and writes it into freshly
allocated shared memory on every sync: about 0.1 GB/s measured on a 2-core CPU box, where a plain
tensor copy runs at 10+ GB/s (benchmarks/RESULTS.md). Here the policy keeps one buffer for the whole
run and each sync is two plain copies: policy tensors -> buffer -> rollout model.

The buffer is a file in /dev/shm that the policy unlinks as soon as it has opened it, so nothing is
left behind whatever way the process ends; a rollout on the same node opens it through the policy's
`/proc/<pid>/fd/<fd>`. Only the driver's sync call decides to use it (every rollout on the policy's
node); anywhere else the object store is the transport.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

Layout = list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, byte offset, byte size
_ALIGN = 64


def available() -> bool:
    return os.path.isdir("/dev/shm") and os.path.isdir(f"/proc/{os.getpid()}/fd")


class SharedWeightsWriter:
    """Policy side (rank 0): `write(state)` copies the tensors into the buffer and returns the handle
    a reader needs. The buffer is sized on first use and again only if the layout changes."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.buffer: torch.Tensor | None = None
        self.layout: Layout | None = None

    def write(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        layout = make_layout(state)
        if layout != self.layout:
            self._allocate(layout[-1][3] + layout[-1][4] if layout else 0)
            self.layout = layout
        for (_, _, _, offset, size), tensor in zip(layout, state.values()):
            view(self.buffer, offset, size, tensor.dtype, tensor.shape).copy_(tensor.detach())
        return {"shared_weights": f"/proc/{os.getpid()}/fd/{self.fd}", "layout": layout,
                "size": int(self.buffer.numel())}

    def _allocate(self, size: int) -> None:
        self.close()
        fd, path = tempfile.mkstemp(prefix="swiftray-weights-", dir="/dev/shm")
        try:
            os.ftruncate(fd, max(size, 1))
            self.buffer = torch.from_file(path, shared=True, size=max(size, 1), dtype=torch.uint8)
        finally:
            os.unlink(path)  # the open fd and the mappings keep the memory; no name is left behind
        self.fd = fd

    def close(self) -> None:
        self.buffer = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SharedWeightsReader:
    """Rollout side: `read(handle)` -> {name: tensor view of the buffer} (no copy; the engine copies)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.buffer: torch.Tensor | None = None

    def read(self, handle: dict[str, Any]) -> dict[str, torch.Tensor]:
        path, size = handle["shared_weights"], handle["size"]
        if path != self.path or self.buffer is None or self.buffer.numel() != size:
            if not os.path.exists(path):
                raise RuntimeError(f"weight sync: shared buffer {path} is not visible from this process "
                                   "(rollout on another node or in another container?)")
            self.buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            self.path = path
        return {name: view(self.buffer, offset, nbytes, getattr(torch, dtype), shape)
                for name, dtype, shape, offset, nbytes in handle["layout"]}


def make_layout(state: dict[str, torch.Tensor]) -> Layout:
    layout: Layout = []
    offset = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        layout.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, size))
        offset += -(-size // _ALIGN) * _ALIGN
    return layout


def view(buffer: torch.Tensor, offset: int, size: int, dtype: torch.dtype, shape: Any) -> torch.Tensor:
    return buffer[offset:offset + size].view(dtype).view(tuple(shape))


def is_handle(item: Any) -> bool:
    return isinstance(item, dict) and "shared_weights" in item
