"""Same-node weight sync through shared memory, in one copy: the policy writes a buffer, the rollout
model's parameters become views of it.

The object-store path (`ray.put` of tensor buckets) pickles every tensor and writes it into freshly
allocated shared memory on every sync: about 0.1 GB/s measured on a 2-core CPU box, where a plain
tensor copy runs at 10+ GB/s (benchmarks/RESULTS.md). Here the policy keeps two buffers for the whole
run and a sync is one plain copy, policy tensors -> buffer; the hf engine then points each parameter
of the rollout model at its slice of the buffer (`HFEngine.load_weights(share=True)`) instead of
copying it out again. Both buffers are written with zeros when they are made, and a reader maps both
(and touches every page) at its first sync, so no later sync takes a page fault on either side.

Double buffering is what makes the aliasing safe: sync k writes buffer k % 2, so after sync k every
rollout computes with buffer k % 2 while the policy's next export writes the other one. The policy
writes buffer k % 2 again only at sync k + 2, and the driver (`controller/rl.py`,
`Roles.sync_weights`) exports k + 2 only after every rollout's `update_weights(k + 1)` has returned,
by which time every rollout's parameters are views of buffer (k + 1) % 2. A caller that exports again
before all rollouts have loaded the last export must not use this transport.

Each buffer is a file in /dev/shm that the policy unlinks as soon as it has opened it, so nothing is
left behind whatever way the process ends; a rollout on the same node opens it through the policy's
`/proc/<pid>/fd/<fd>` and keeps its mapping (and so the memory) for as long as its parameters use it.
Only the driver's sync call decides to use it (every rollout on the policy's node); anywhere else the
object store is the transport.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

import torch

Layout = list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, byte offset, byte size
_ALIGN = 64
_PAGE = 4096


def available() -> bool:
    return os.path.isdir("/dev/shm") and os.path.isdir(f"/proc/{os.getpid()}/fd")


class SharedWeightsWriter:
    """Policy side (rank 0): `write(state)` copies the tensors into buffer `syncs % 2` and returns the
    handle a reader needs. Both buffers are sized on first use and again only if the layout changes."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.buffers: list[torch.Tensor] = []
        self.layout: Layout | None = None
        self.generation = ""  # new for every allocation: a reader never confuses a new buffer with an old one
        self.syncs = 0

    def write(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        layout = make_layout(state)
        if layout != self.layout:
            self._allocate(max((offset + size for *_, offset, size in layout), default=0))
            self.layout = layout
        index = self.syncs % 2
        buffer = self.buffers[index]
        written: set[int] = set()
        for (_, _, _, offset, size), tensor in zip(layout, state.values()):
            if size and offset not in written:  # a tied weight's second name: already there
                view(buffer, offset, size, tensor.dtype, tensor.shape).copy_(tensor.detach())
                written.add(offset)
        self.syncs += 1
        paths = [f"/proc/{os.getpid()}/fd/{fd}" for fd in self.fds]
        return {"shared_weights": paths[index], "buffers": paths, "generation": self.generation,
                "layout": layout, "size": int(buffer.numel())}

    def _allocate(self, size: int) -> None:
        self.close()
        size = max(size, 1)
        free = os.statvfs("/dev/shm")
        if free.f_bavail * free.f_frsize < 2 * size:
            raise MemoryError(f"weight sync: /dev/shm has {free.f_bavail * free.f_frsize / 2**20:.0f} MiB free, "
                              f"two weight buffers need {2 * size / 2**20:.0f} MiB")
        for _ in range(2):
            fd, path = tempfile.mkstemp(prefix="swiftray-weights-", dir="/dev/shm")
            try:
                os.ftruncate(fd, size)
                buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            except BaseException:
                os.close(fd)
                raise
            finally:
                os.unlink(path)  # the open fd and the mappings keep the memory; no name is left behind
            self.fds.append(fd)
            self.buffers.append(buffer.zero_())  # every page allocated and mapped now, not during a sync
        self.generation = uuid.uuid4().hex
        self.syncs = 0

    def close(self) -> None:
        self.buffers = []
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class SharedWeightsReader:
    """Rollout side: `read(handle)` -> {name: tensor view of the buffer} (no copy). The views stay
    valid after the writer has moved on: this process's mapping keeps the memory."""

    def __init__(self) -> None:
        self.mapped: dict[tuple[str, int], torch.Tensor] = {}  # (path, size) -> buffer, this generation only
        self.generation: str | None = None
        self.path: str | None = None  # the buffer read last

    def read(self, handle: dict[str, Any]) -> dict[str, torch.Tensor]:
        size = handle["size"]
        if handle.get("generation") != self.generation:  # new buffers (fd numbers may be reused)
            self.mapped = {}  # parameters that still use an old buffer keep it alive through their views
            self.generation = handle.get("generation")
        for path in handle.get("buffers", [handle["shared_weights"]]):  # map both at the first sync
            if (path, size) not in self.mapped:
                self.mapped[(path, size)] = _map(path, size)
        self.path = handle["shared_weights"]
        buffer = self.mapped[(self.path, size)]
        return {name: view(buffer, offset, nbytes, getattr(torch, dtype), shape)
                for name, dtype, shape, offset, nbytes in handle["layout"]}


def _map(path: str, size: int) -> torch.Tensor:
    if not os.path.exists(path):
        raise RuntimeError(f"weight sync: shared buffer {path} is not visible from this process "
                           "(rollout on another node or in another container?)")
    buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    buffer[::_PAGE].sum()  # map every page now (a read fault each), not in the first forward after a sync
    return buffer


def make_layout(state: dict[str, torch.Tensor]) -> Layout:
    """Where each tensor goes in the buffer. Names of one tensor (tied weights: lm_head.weight is
    embed_tokens.weight) share one place, written once; a buffer never has two copies of it."""
    layout: Layout = []
    offset = 0
    placed: dict[tuple, int] = {}
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        at = placed.get(key) if size else None
        if at is None:
            at = placed[key] = offset
            offset += -(-size // _ALIGN) * _ALIGN
        layout.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), at, size))
    return layout


def view(buffer: torch.Tensor, offset: int, size: int, dtype: torch.dtype, shape: Any) -> torch.Tensor:
    return buffer[offset:offset + size].view(dtype).view(tuple(shape))


def is_handle(item: Any) -> bool:
    return isinstance(item, dict) and "shared_weights" in item
