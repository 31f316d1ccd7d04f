"""Weights by broadcast: policy rank 0 and the rollout engines on other nodes share a process group of
their own (gloo on CPU, NCCL on GPU) and rank 0 broadcasts the weights to all of them at once.

The group is made apart from the policy's own process group (a process may hold one default group;
this one is a ProcessGroupGloo/NCCL object on a store that rank 0 serves), so that engines can join and
leave it without the policy's ranks. The driver rebuilds it, with a new epoch, whenever its members
change (an engine replaced or added, policy rank 0 restarted).

A sync is a header, then buckets:

    header   int64 [length], then uint8 [length]: JSON {"version", "layout": [[name, dtype, shape], ...],
             "buckets": [[first tensor, end tensor, bytes], ...]}
    buckets  one flat uint8 tensor each (about bucket_bytes), the tensors' bytes one after another, each
             starting at a multiple of 64 bytes

so that a receiver allocates each bucket before it arrives, and every sync carries its version.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=5)
ALIGN = 64  # every tensor starts at a multiple of this in its bucket, so that any dtype can view it


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class WeightBroadcast:
    """One member of a weight-broadcast group: rank 0 sends (`send`), every other rank receives."""

    def __init__(self, master_addr: str, master_port: int, rank: int, size: int, backend: str, epoch: int,
                 listen_socket: Any = None):
        self.rank, self.size, self.epoch = rank, size, epoch
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        store = dist.TCPStore(master_addr, master_port, size, is_master=rank == 0, timeout=TIMEOUT,
                              master_listen_fd=listen_socket.detach() if listen_socket is not None else None)
        store = dist.PrefixStore(f"swiftray-weights-{epoch}", store)
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(store, rank, size)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, size, TIMEOUT)
        self._store = store  # rank 0 serves it for as long as the group lives

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()

    def send(self, state: dict[str, torch.Tensor], version: int, bucket_bytes: int) -> int:
        """Rank 0: broadcast `state` in buckets of about `bucket_bytes`; returns the bytes sent."""
        names = list(state)
        tensors = [state[n].detach().contiguous() for n in names]
        sizes = [t.numel() * t.element_size() for t in tensors]
        buckets, first, total = [], 0, 0
        for i, size in enumerate(sizes):
            total += _aligned(size)
            if total >= bucket_bytes or i == len(sizes) - 1:
                buckets.append([first, i + 1, total])
                first, total = i + 1, 0
        header = json.dumps({"version": version, "buckets": buckets,
                             "layout": [[n, str(t.dtype).removeprefix("torch."), list(t.shape)]
                                        for n, t in zip(names, tensors)]}).encode()
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device))
        sent = 0
        for start, end, nbytes in buckets:
            flat = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            offset = 0
            for i in range(start, end):
                flat[offset:offset + sizes[i]] = tensors[i].to(self.device).reshape(-1).view(torch.uint8)
                offset += _aligned(sizes[i])
            self._broadcast(flat)
            sent += sum(sizes[start:end])
        return sent

    def receive(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Every other rank: (version, {name: tensor}) of one `send`; tensors are views of the buckets."""
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(length)
        raw = torch.zeros(int(length.item()), dtype=torch.uint8, device=self.device)
        self._broadcast(raw)
        header = json.loads(raw.cpu().numpy().tobytes().decode())
        layout = header["layout"]
        out: dict[str, torch.Tensor] = {}
        for start, end, nbytes in header["buckets"]:
            flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._broadcast(flat)
            offset = 0
            for name, dtype, shape in layout[start:end]:
                dt = getattr(torch, dtype)
                size = dt.itemsize * int(torch.Size(shape).numel())
                out[name] = flat[offset:offset + size].view(dt).view(shape)
                offset += _aligned(size)
        return int(header["version"]), out
