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
        self, rank: int, world_size: int, master_addr: str, master_port: int, backend: str | None, num_threads: int
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
        if backend is None:  # a group without collectives (e.g. actors on fake GPUs in tests)
            return
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

    def call_with_receipt(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """(method's result, receipt): called with num_returns=2, so that the driver learns that a call
        finished, where, on which weight version and what it noted (`receipt_notes`), without fetching
        the result itself; a receipt that fails on its own means this actor died (controller/work.py)."""
        import time

        start = time.time()
        result = getattr(self, method)(*args, **kwargs)
        return result, {"node": self.node_id(), "pid": os.getpid(), "version": getattr(self, "version", None),
                        "seconds": time.time() - start, **self.receipt_notes()}

    def receipt_notes(self) -> dict[str, Any]:
        """What the last call wants the driver to know (a reward actor: the samples it cut off)."""
        return {}

    def use_cores(self, share: float) -> int:
        """Set torch's threads to `share` of this node's cores (at least 1); returns the thread count.

        Ray's logical CPUs are a scheduling budget, not threads: the driver retunes threads to
        what actually runs at the same time (the run plan's `threads_share` of each role).
        """
        import torch

        torch.set_num_threads(max(1, int((os.cpu_count() or 1) * share)))
        return torch.get_num_threads()

    def device_memory_gb(self) -> float | None:
        """GiB in use on this actor's GPU (every process on it, as nvidia-smi counts); None without CUDA."""
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30

    def ping(self) -> dict[str, Any]:
        """Rank facts, for tests and debugging."""
        import torch

        return {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                "num_threads": torch.get_num_threads()}


class ActorGroup:
    """`num_workers` actors of `actor_cls`, ranks 0..N-1, joined in a torch.distributed group.

    `actor_cls` is a plain class subclassing DistributedWorker (or its ray.remote form); each actor
    is built with `actor_cls(*init_args)`. By default the group makes its own PACKed placement group,
    one bundle per worker. Given `placement_group` and `bundles` (the run plan's), each worker goes in
    its bundle of that shared group instead: how roles share the policy's GPUs. The process group
    uses `backend`: "auto" is nccl when workers have GPUs and gloo otherwise; None makes none.

    `data_ranks` (the run plan's, for model-parallel trainers such as Megatron's): the data shard each
    rank takes; ranks of one model-parallel group share one. Empty: rank i takes shard i.
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
        placement_group: Any = None,
        bundles: tuple[int, ...] | None = None,
        backend: str | None = "auto",
        data_ranks: tuple[int, ...] = (),
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"ActorGroup {name!r}: num_workers must be >= 1, got {num_workers}")
        if num_cpus_per_worker <= 0:
            raise ValueError(f"ActorGroup {name!r}: num_cpus_per_worker must be > 0, got {num_cpus_per_worker}")
        if data_ranks and (len(data_ranks) != num_workers or set(data_ranks) != set(range(max(data_ranks) + 1))):
            raise ValueError(f"ActorGroup {name!r}: data_ranks {data_ranks} must give each of {num_workers} ranks "
                             "a shard, every shard 0..N-1 taken")
        self.name = name
        self.num_workers = num_workers
        self.data_ranks = tuple(data_ranks) or tuple(range(num_workers))
        self.num_shards = max(self.data_ranks) + 1
        self.actor_cls = actor_cls
        self.init_args = init_args
        self.num_cpus_per_worker, self.num_gpus_per_worker = num_cpus_per_worker, num_gpus_per_worker
        self.actors: list = []
        self._pg = None  # only a placement group this group made itself is removed at shutdown
        if placement_group is None:
            bundle = {"CPU": float(num_cpus_per_worker)}
            if num_gpus_per_worker:
                bundle["GPU"] = float(num_gpus_per_worker)
            self._pg = placement_group_for(name, [dict(bundle) for _ in range(num_workers)], placement_timeout_s)
            placement_group, bundles = self._pg, tuple(range(num_workers))
        if bundles is None or len(bundles) != num_workers:
            raise ValueError(f"ActorGroup {name!r}: {num_workers} workers need {num_workers} bundle indices, "
                             f"got {bundles}")
        self.placement_group, self.bundles = placement_group, tuple(bundles)
        self.backend = ("nccl" if num_gpus_per_worker else "gloo") if backend == "auto" else backend
        self.actors = [self._start_actor(rank) for rank in range(num_workers)]
        try:
            self._join(self.actors)
        except Exception:
            self.shutdown()
            raise

    def _start_actor(self, rank: int, scheduling_strategy: Any = None) -> Any:
        """Rank `rank`'s actor in its bundle, or where `scheduling_strategy` says (a replacement whose
        bundle has no node, an engine added to the elastic pool)."""
        remote_cls = self.actor_cls if hasattr(self.actor_cls, "remote") else ray.remote(self.actor_cls)
        if scheduling_strategy is None:
            scheduling_strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=self.bundles[rank])
        return remote_cls.options(
            num_cpus=self.num_cpus_per_worker,
            num_gpus=self.num_gpus_per_worker,
            scheduling_strategy=scheduling_strategy,
        ).remote(*self.init_args)

    def start_single(self, rank: int, timeout_s: float = 60, scheduling_strategy: Any = None) -> Any:
        """A new actor for rank `rank` that joins no process group (a replacement of a lost actor of a
        role whose ranks never talk to each other, or an extra engine), started and reachable.

        It is started both in the rank's bundle and anywhere with room (the bundle's node may be gone and
        the placement group unable to place it again); the first one up is kept. Raises RuntimeError
        naming the role when neither is up within `timeout_s`."""
        own = [None] if rank < len(self.bundles) else []  # its bundle (Ray may be moving it to another node)
        strategies = [scheduling_strategy] if scheduling_strategy is not None else own + ["DEFAULT"]
        # Each way at once: the first actor up wins (a bundle whose node is gone may never be placed again).
        actors = [self._start_actor(rank, strategy) for strategy in strategies]
        ready = {actor.init_distributed.remote(rank, self.num_workers, "", 0, None,
                                               max(1, int(self.num_cpus_per_worker))): actor for actor in actors}
        winner = None
        pending = list(ready)
        while pending and winner is None:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not done:
                break
            try:
                ray.get(done[0])
                winner = ready[done[0]]
            except ray.exceptions.RayActorError:
                continue
        for actor in actors:
            if actor is not winner:
                ray.kill(actor)
        if winner is None:
            raise RuntimeError(f"role {self.name!r}: no room for a new actor ({self.num_cpus_per_worker:g} CPU, "
                               f"{self.num_gpus_per_worker:g} GPU) within {timeout_s:g}s; free: "
                               f"{ {k: v for k, v in ray.available_resources().items() if k in ('CPU', 'GPU')} }")
        return winner

    def restart(self) -> None:
        """Every rank anew in its bundle, joined in a new process group (the policy after losing a rank).
        The caller sets the new actors up."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = [self._start_actor(rank) for rank in range(self.num_workers)]
        self._join(self.actors)

    def _join(self, actors: list) -> None:
        """Rendezvous: every rank joins the group's process group (or, without one, learns its rank)."""
        master_addr, master_port = ray.get(actors[0].get_master_address.remote())
        num_threads = max(1, int(self.num_cpus_per_worker))
        ray.get([
            actor.init_distributed.remote(rank, len(actors), master_addr, master_port, self.backend, num_threads)
            for rank, actor in enumerate(actors)
        ])

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every rank; one ObjectRef per rank, in rank order.

        Each rank gets its own copy of the arguments: `ray.put` a large one once and pass the ref.
        """
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_all_ranked(self, method: str, per_rank_args: list, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(per_rank_args[rank], *args, **kwargs)` on each rank (e.g. its batch shard). Given
        one argument per data shard instead (`num_shards` < ranks), each rank gets its shard's."""
        if len(per_rank_args) == self.num_shards != self.num_workers:
            per_rank_args = [per_rank_args[shard] for shard in self.data_ranks]
        if len(per_rank_args) != self.num_workers:
            raise ValueError(
                f"ActorGroup {self.name!r}: {len(per_rank_args)} per-rank args for {self.num_workers} ranks"
            )
        return [getattr(actor, method).remote(arg, *args, **kwargs)
                for actor, arg in zip(self.actors, per_rank_args)]

    def one_per_shard(self, per_rank: list) -> list:
        """From one result per rank (call_all_ranked's), the first rank's of each data shard, in shard order."""
        first = {}
        for rank, shard in enumerate(self.data_ranks):
            first.setdefault(shard, per_rank[rank])
        return [first[shard] for shard in range(self.num_shards)]

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Call `method` on one rank only. Collective methods (setup, train_step...) must use call_all."""
        return getattr(self.actors[rank], method).remote(*args, **kwargs)

    def get_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        """call_all, then wait for and return every rank's result."""
        return ray.get(self.call_all(method, *args, **kwargs))

    def shutdown(self) -> None:
        """Kill the actors and free the placement group it made; safe to call twice."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def placement_group_for(name: str, bundles: list[dict[str, float]], timeout_s: float = 60) -> Any:
    """A PACKed placement group, ready; a clear error naming what was asked for when it cannot be placed
    (Ray itself would wait forever)."""
    pg = placement_group(bundles, strategy="PACK", name=f"swiftray-{name}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU", "memory")}
        raise RuntimeError(
            f"role {name!r} asked for {len(bundles)} worker(s) x {bundles[0]} (placement group, PACK) and got no "
            f"placement within {timeout_s:g}s. Cluster total: {total}; available now: {free}. Lower this "
            "role's num_workers or CPUs/GPUs per worker (fractions are allowed), colocate roles, or add nodes."
        ) from None
    return pg
