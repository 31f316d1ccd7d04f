"""Policy -> rollout engines, each engine on the path the plan gives it (ClusterPlan.transport):

    shared_memory   engines on policy rank 0's node: one of rank 0's two shared-memory buffers, which
                    the hf engine uses as its weights (actors/shared_weights.py)
    collective      engines on other nodes: one broadcast from rank 0 over a process group it shares with
                    them (actors/collective_sync.py), rebuilt whenever its members change
    object_store    ray.put buckets that every engine fetches (a new engine's first weights, or by choice)

Every sync carries a version; it returns once every engine holds it. An engine that dies during a sync
is handed to the supervisor (replaced, and its replacement caught up to the version), and a broken
broadcast group is rebuilt before the next sync.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from swiftray.controller.roles import RunningRoles
from swiftray.plan import RunPlan

logger = logging.getLogger("swiftray")


class WeightSync:
    def __init__(self, plan: RunPlan, roles: RunningRoles, supervisor: Any, bucket_bytes: int):
        self.plan, self.roles, self.supervisor, self.bucket_bytes = plan, roles, supervisor, bucket_bytes
        self.backend = "nccl" if plan.dist_backend == "nccl" else "gloo"
        self.engine_kind = getattr(plan.role("rollout").config, "engine", "hf")
        self.group_members: tuple | None = None  # (policy rank 0 actor id, engine actor ids) of the broadcast group
        self.epoch = 0
        self.last: dict[str, int] = {}  # transport -> engines it served at the last sync
        self.policy_node: tuple[Any, str] | None = None  # (policy rank 0's actor id, its node)

    def transports(self) -> dict[str, list[Any]]:
        """The engines of each transport, by where they are now."""
        policy0 = self.roles["policy"].actors[0]
        if self.policy_node is None or self.policy_node[0] != policy0._actor_id:
            self.policy_node = (policy0._actor_id, ray.get(policy0.node_id.remote()))
        out: dict[str, list[Any]] = {}
        for engine in self.roles["rollout"].actors:
            # Where the supervisor saw it start: asking it now would fail for an engine lost since.
            node = self.supervisor.engine_nodes.get(engine._actor_id)
            out.setdefault(self.plan.cluster_plan.transport(node == self.policy_node[1], self.engine_kind),
                           []).append(engine)
        return out

    def sync(self, version: int) -> float:
        start = time.time()
        self.supervisor.check_engine_nodes()
        paths = self.transports()
        self.last = {k: len(v) for k, v in paths.items()}
        policy = self.roles["policy"]
        pending: list[tuple[Any, Any]] = []  # (engine, ref) of every engine's update
        waits: list[Any] = []
        for transport in ("shared_memory", "object_store"):
            if paths.get(transport):
                exports = policy.call_all("export_weights", self.bucket_bytes,
                                          shared_memory=transport == "shared_memory")
                waits += exports[1:]
                pending += self._call(paths[transport], "update_weights", version, exports[0])
        collective = self._ensure_group(paths["collective"]) if paths.get("collective") else []
        if collective:
            waits += policy.call_all("broadcast_weights", version, self.bucket_bytes)
            pending += self._call(collective, "receive_weights")
        broken, failed = False, []
        for engine, ref in pending:
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                self.supervisor.lost("rollout", engine, err)  # its replacement is caught up to the new weights
                broken = True
            except ray.exceptions.RayTaskError as err:  # a broadcast broken by another member's loss
                failed.append((engine, err))
        try:
            ray.get(waits)
        except ray.exceptions.RayTaskError as err:
            failed.append((None, err))
        if failed:
            if not broken:
                raise failed[0][1]
            self.group_members = None  # rebuilt at the next sync
            current = {a._actor_id for a in self.roles["rollout"].actors}
            survivors = [e for e, _ in failed if e is not None and e._actor_id in current]
            self.supervisor.catch_up(survivors)  # this version through the object store
        return time.time() - start

    def _call(self, engines: list[Any], method: str, *args: Any) -> list[tuple[Any, Any]]:
        """(engine, ref) of `method` on each of `engines` (through the group when they are all of it)."""
        group = self.roles["rollout"]
        if [e._actor_id for e in engines] == [e._actor_id for e in group.actors]:
            return list(zip(group.actors, group.call_all(method, *args)))
        return [(e, getattr(e, method).remote(*args)) for e in engines]

    def _ensure_group(self, engines: list[Any]) -> list[Any]:
        """A broadcast group of policy rank 0 and `engines`, new when its members changed; the engines in it.

        Before a new group is made, its engines are asked whether they are there: one that is gone would
        leave the others waiting for it. A lost one is replaced (caught up through the object store)."""
        policy0 = self.roles["policy"].actors[0]
        members = (policy0._actor_id, tuple(e._actor_id for e in engines))
        if members == self.group_members:
            return engines
        while True:
            pings = {e.node_id.remote(): e for e in engines}
            ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=30)
            gone = []
            for ref, engine in pings.items():
                try:
                    if ref not in ready:
                        raise ray.exceptions.GetTimeoutError("no answer within 30s")
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.GetTimeoutError) as err:
                    self.supervisor.lost("rollout", engine, err)
                    gone.append(engine)
            if not gone:
                break
            engines = self.transports().get("collective", [])
            if not engines:
                return []
        self.epoch += 1
        addr, port = ray.get(policy0.get_master_address.remote())
        size = len(engines) + 1
        ray.get([policy0.join_weight_group.remote(addr, port, size, self.backend, self.epoch)]
                + [e.join_weight_group.remote(addr, port, rank, size, self.backend, self.epoch)
                   for rank, e in enumerate(engines, start=1)])
        self.group_members = (policy0._actor_id, tuple(e._actor_id for e in engines))
        logger.info("weight broadcast group %d: policy rank 0 and %d engine(s) (%s)", self.epoch, len(engines),
                    self.backend)
        return engines
