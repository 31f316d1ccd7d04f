"""ActorGroup: N ranks of one role, placed together and joined in a torch.distributed group.

The driver talks to a role only through its group: `call_all` fans a method out to
every rank, `call_all_ranked` gives each rank its own argument (its shard of a
batch), `call_rank` addresses one rank. Calls return ObjectRefs; `get_all` waits.

Actor classes subclass `DistributedWorker`, which holds the rendezvous code, so a
role's own file contains only what that role does.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class DistributedWorker:
    """Base class of every actor that ActorGroup starts: rank bookkeeping and rendezvous."""

    rank: int = 0
    world_size: int = 1

    def get_master_address(self) -> tuple[str, int]:
        """This node's IP (as Ray knows it) and a port listening on that IP only: the process group's
        store, which rank 0 serves and every rank connects to. On a loopback-only local cluster the
        IP is 127.0.0.1, so the store is not reachable from other machines."""
        ip = ray.util.get_node_ip_address()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self._store_socket = socket.socket(family, socket.SOCK_STREAM)
        self._store_socket.bind((ip, 0))
        self._store_socket.listen(128)
        return ip, self._store_socket.getsockname()[1]

    def init_distributed(
        self, rank: int, world_size: int, master_addr: str, master_port: int, backend: str, num_threads: int
    ) -> None:
        """Join the group's process group; blocks until every rank has called it."""
        import torch
        import torch.distributed as dist

        torch.set_num_threads(num_threads)
        self.rank, self.world_size = rank, world_size
        # torch.distributed, DeepSpeed and HF read these; Ray shows each actor only its own
        # GPU(s), so the local device index is always 0.
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
        )
        if backend == "nccl":
            torch.cuda.set_device(0)
        timeout = timedelta(minutes=30)
        listen = getattr(self, "_store_socket", None) if rank == 0 else None
        # Rank 0 serves the store on the socket get_master_address bound (torch's own would listen on
        # every interface).
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout,
                              master_listen_fd=listen.detach() if listen is not None else None)
        self._store_socket = None
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def use_cores(self, share: float) -> int:
        """Set torch's threads to `share` of this node's cores (at least 1); returns the thread count.

        Ray's logical CPUs are a scheduling budget, not threads: the driver retunes threads to
        what actually runs at the same time (see controller/rl.py `thread_shares`).
        """
        import torch

        torch.set_num_threads(max(1, int((os.cpu_count() or 1) * share)))
        return torch.get_num_threads()

    def ping(self) -> dict[str, Any]:
        """Rank facts, for tests and debugging."""
        import torch

        return {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                "num_threads": torch.get_num_threads()}


class ActorGroup:
    """`num_workers` actors of `actor_cls` in one PACKed placement group, ranks 0..N-1.

    `actor_cls` is a plain class subclassing DistributedWorker (or its ray.remote form);
    each actor is built with `actor_cls(*init_args)`. The process group uses nccl when
    workers have GPUs and gloo otherwise.
    """

    def __init__(
        self,
        actor_cls: type,
        num_workers: int,
        *,
        num_cpus_per_worker: float,
        num_gpus_per_worker: float = 0,
        name: str,
        placement_timeout_s: float = 60,
        init_args: tuple = (),
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"ActorGroup {name!r}: num_workers must be >= 1, got {num_workers}")
        if num_cpus_per_worker <= 0:
            raise ValueError(f"ActorGroup {name!r}: num_cpus_per_worker must be > 0, got {num_cpus_per_worker}")
        self.name = name
        self.num_workers = num_workers
        bundle = {"CPU": float(num_cpus_per_worker)}
        if num_gpus_per_worker:
            bundle["GPU"] = float(num_gpus_per_worker)
        self._pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK",
                                   name=f"swiftray-{name}")
        self._wait_for_placement(bundle, placement_timeout_s)

        remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
        self.actors = [
            remote_cls.options(
                num_cpus=num_cpus_per_worker,
                num_gpus=num_gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank
                ),
            ).remote(*init_args)
            for rank in range(num_workers)
        ]
        try:
            master_addr, master_port = ray.get(self.actors[0].get_master_address.remote())
            backend = "nccl" if num_gpus_per_worker else "gloo"
            num_threads = max(1, int(num_cpus_per_worker))
            ray.get([
                actor.init_distributed.remote(rank, num_workers, master_addr, master_port, backend, num_threads)
                for rank, actor in enumerate(self.actors)
            ])
        except Exception:
            self.shutdown()
            raise

    def _wait_for_placement(self, bundle: dict, timeout_s: float) -> None:
        try:
            ray.get(self._pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self._pg)
            total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU", "memory")}
            raise RuntimeError(
                f"ActorGroup {self.name!r} asked for {self.num_workers} worker(s) x {bundle} "
                f"(placement group, PACK) and got no placement within {timeout_s:g}s. "
                f"Cluster total: {total}; available now: {free}. Lower this role's num_workers or "
                f"CPUs/GPUs per worker (fractions are allowed), colocate roles, or add nodes."
            ) from None

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every rank; one ObjectRef per rank, in rank order.

        Each rank gets its own copy of the arguments: `ray.put` a large one once and pass the ref.
        """
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_all_ranked(self, method: str, per_rank_args: list, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(per_rank_args[rank], *args, **kwargs)` on each rank (e.g. its batch shard)."""
        if len(per_rank_args) != self.num_workers:
            raise ValueError(
                f"ActorGroup {self.name!r}: {len(per_rank_args)} per-rank args for {self.num_workers} ranks"
            )
        return [getattr(actor, method).remote(arg, *args, **kwargs)
                for actor, arg in zip(self.actors, per_rank_args)]

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Call `method` on one rank only. Collective methods (setup, train_step...) must use call_all."""
        return getattr(self.actors[rank], method).remote(*args, **kwargs)

    def get_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        """call_all, then wait for and return every rank's result."""
        return ray.get(self.call_all(method, *args, **kwargs))

    def shutdown(self) -> None:
        """Kill the actors and free the placement group; safe to call twice."""
        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
