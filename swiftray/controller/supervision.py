"""Keeping a run's roles at strength while actors and nodes come and go.

Stateless roles (rollout engines, reward functions, the reference model): an actor that died is replaced
in its bundle (or, when its node is gone and the bundle has nowhere to go, anywhere with room), set up
with its role's config and, for an engine, brought to the current weights; work.py issues its unfinished
calls again. The rollout pool is elastic between --min_infer_workers and --max_infer_workers: at each
request `refresh_pool` starts an engine on every node that joined (while the pool is below its maximum),
and an engine lost with its node is dropped rather than replaced while the pool stays at its minimum.
The pool yields to the roles a run cannot go without: a reference or reward actor that finds no room
stops an engine above the minimum and takes its place.

Every loss and its recovery is an event (`events`): what died, where, and the seconds its recovery
took; each role may lose --max_restarts actors before the run gives up.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from swiftray.controller.roles import RunningRoles
from swiftray.plan import RunPlan

logger = logging.getLogger("swiftray")

START_TIMEOUT_S = 180.0
# A reference or reward actor with no room waits this long before an engine above the pool's minimum
# yields its place: long enough for a process to start on a busy node.
YIELD_AFTER_S = 60.0


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class NodeGone(RuntimeError):
    """An actor's node left the cluster (what `lost` is told when no call of the actor has failed yet)."""


class Supervisor:
    """Replaces lost actors of stateless roles and sizes the elastic rollout pool.

    `catch_up(actors)` brings new engines to the current weights (RLStep knows how)."""

    def __init__(self, plan: RunPlan, roles: RunningRoles, catch_up: Callable[[list[Any]], None]):
        self.plan, self.roles, self.catch_up = plan, roles, catch_up
        c = plan.cluster_plan
        self.max_restarts = c.max_restarts
        engines = len(roles["rollout"].actors) if roles.get("rollout") else 0
        self.min_engines = c.min_engines or engines
        self.max_engines = max(c.max_engines or engines, engines)
        self.losses: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []
        self.known_nodes = alive_nodes()
        self.engine_nodes: dict[Any, str] = {}  # engine actor id -> node id
        self.changed = False  # the engines changed since the last weight sync (a collective group is stale)
        if engines:
            nodes = ray.get([a.node_id.remote() for a in roles["rollout"].actors])
            self.engine_nodes = {a._actor_id: n for a, n in zip(roles["rollout"].actors, nodes)}

    def actors(self, role: str) -> list[Any]:
        return self.roles[role].actors

    def lost(self, role: str, actor: Any, err: BaseException) -> None:
        """`actor` of `role` failed with `err`: replace it (once, however many calls report it)."""
        group = self.roles[role]
        rank = next((i for i, a in enumerate(group.actors) if a._actor_id == actor._actor_id), None)
        if rank is None:
            return  # already replaced
        start = time.time()
        self.losses[role] += 1
        node = self.engine_nodes.get(actor._actor_id)
        logger.warning("%s actor %d lost (%s); replacing it", role, rank, type(err).__name__)
        if self.losses[role] > self.max_restarts:
            raise RuntimeError(f"role {role!r} lost {self.losses[role]} actors, more than --max_restarts "
                               f"{self.max_restarts}") from err
        ray.kill(actor)  # an unreachable actor may still run: end it before its work is given to another
        if role == "rollout" and node not in alive_nodes() and len(group.actors) > self.min_engines:
            del group.actors[rank]
            self.engine_nodes.pop(actor._actor_id, None)
            self.changed = True
            self._event("engine_dropped", role, rank, start, node)
            return
        can_yield = role != "rollout" and self._spare_engines() > 0
        try:
            new = self._start(role, rank, timeout_s=YIELD_AFTER_S if can_yield else START_TIMEOUT_S)
        except RuntimeError:
            if role == "rollout" and len(group.actors) > self.min_engines:
                del group.actors[rank]
                self.changed = True
                self._event("engine_dropped", role, rank, start, node)
                return
            if not can_yield:
                raise
            # The engines above the pool's minimum took the room this role needs: one yields its place.
            engines = self.roles["rollout"].actors
            engine = engines.pop()
            ray.kill(engine)  # its unfinished chunks come back to work.py as lost, and are issued again
            self.engine_nodes.pop(engine._actor_id, None)
            self.changed = True
            self._event("engine_dropped", "rollout", len(engines), start, None)
            logger.warning("rollout engine %d stopped to make room for the %s actor", len(engines), role)
            new = self._start(role, rank)
        group.actors[rank] = new
        self._event("actor_replaced", role, rank, start, node)

    def check_engine_nodes(self) -> None:
        """Hand over every engine whose node is gone. An engine with no work in flight when its node went
        raises nothing until it is called, and a weight broadcast would wait for it until gloo's timeout."""
        if not self.roles.get("rollout"):
            return
        alive = alive_nodes()
        for engine in list(self.roles["rollout"].actors):
            node = self.engine_nodes.get(engine._actor_id)
            if node is not None and node not in alive:
                self.lost("rollout", engine, NodeGone(f"node {node[:12]} left the cluster"))

    def _spare_engines(self) -> int:
        """Engines the pool can lose and stay at its minimum."""
        return len(self.roles["rollout"].actors) - self.min_engines if self.roles.get("rollout") else 0

    def _start(self, role: str, rank: int, strategy: Any = None, timeout_s: float = START_TIMEOUT_S) -> Any:
        """A set-up actor of `role` for `rank` (an engine also at the current weights)."""
        group, plan_role = self.roles[role], self.plan.role(role)
        actor = group.start_single(rank, timeout_s, strategy)
        ray.get(actor.setup.remote(plan_role.config))
        if plan_role.threads_share is not None:
            ray.get(actor.use_cores.remote(plan_role.threads_share))
        if role == "rollout":
            self.catch_up([actor])
            self.engine_nodes[actor._actor_id] = ray.get(actor.node_id.remote())
            self.changed = True
        return actor

    def refresh_pool(self) -> None:
        """Start an engine on each node that joined since the last look, while the pool is under its maximum."""
        if not self.roles.get("rollout"):
            return
        nodes = alive_nodes()
        joined, self.known_nodes = nodes - self.known_nodes, nodes
        group = self.roles["rollout"]
        for node in sorted(joined):
            if len(group.actors) >= self.max_engines:
                break
            start = time.time()
            try:
                actor = self._start("rollout", len(group.actors), NodeAffinitySchedulingStrategy(node, soft=False))
            except RuntimeError as err:
                logger.warning("node %s joined but has no room for an engine: %s", node[:12], err)
                continue
            group.actors.append(actor)
            self._event("engine_added", "rollout", len(group.actors) - 1, start, node)
            logger.info("node %s joined: rollout engine %d started there", node[:12], len(group.actors) - 1)

    def _event(self, kind: str, role: str, rank: int, start: float, node: str | None) -> None:
        self.events.append({"kind": kind, "role": role, "rank": rank, "node": node,
                            "seconds": round(time.time() - start, 3), "at": time.time()})

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
