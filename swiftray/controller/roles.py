"""The running actor groups of a run, started from its plan.

Placement groups come first (one per group the plan names; roles that share the policy's GPUs run
in the policy's bundles), then every role's ActorGroup, started side by side and set up with the
role's own config. Nothing here decides where a role goes or when it is called: the plan decides
the first, the driver loop (sft.py, rl.py) the second.
"""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from swiftray.actors.group import ActorGroup, placement_group_for
from swiftray.plan import RolePlan, RunPlan

logger = logging.getLogger("swiftray")


def import_actor(path: str) -> type:
    """"module:Class" -> the class (an algorithm names its roles' actors this way, staying free of Ray)."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"actor {path!r}: cannot import it ({err})") from err


class RunningRoles:
    """Every role of `plan` as an ActorGroup: `roles["policy"]`, `roles.get("reference")`."""

    def __init__(self, plan: RunPlan, *, collectives: bool = True, placement_timeout_s: float = 60):
        self.plan = plan
        self.groups: dict[str, ActorGroup] = {}
        self._pgs: dict[str, Any] = {}
        try:
            for name, bundles in plan.groups.items():
                self._pgs[name] = placement_group_for(name, [dict(b) for b in bundles], placement_timeout_s)
            self._start_all(collectives)
        except BaseException:
            self.shutdown()  # a role that failed to start must not leave the others running
            raise

    def _start_all(self, collectives: bool) -> None:
        # Roles start side by side: waiting for processes and loading models is most of a short run.
        errors = []
        with ThreadPoolExecutor(len(self.plan.roles)) as pool:
            futures = {role.name: pool.submit(self._start, role, collectives) for role in self.plan.roles}
            for name, future in futures.items():
                try:
                    self.groups[name] = future.result()
                except Exception as err:  # the others still finish, so that shutdown() finds them
                    errors.append(err)
        if errors:
            raise errors[0]
        ray.get([actor.use_cores.remote(role.threads_share) for role in self.plan.roles
                 if role.threads_share is not None for actor in self.groups[role.name].actors])

    def _start(self, role: RolePlan, collectives: bool) -> ActorGroup:
        p = role.placement
        backend = (self.plan.dist_backend if role.name == "policy" else "auto") if collectives else None
        group = ActorGroup(import_actor(role.actor), p.num_workers, num_cpus_per_worker=p.num_cpus,
                           num_gpus_per_worker=p.num_gpus, name=role.name, placement_group=self._pgs[p.group],
                           bundles=p.bundles, backend=backend, data_ranks=role.data_ranks)
        if collectives:
            ray.get(group.call_all("setup", role.config))
        return group

    def __getitem__(self, name: str) -> ActorGroup:
        return self.groups[name]

    def get(self, name: str) -> ActorGroup | None:
        return self.groups.get(name)

    def in_phase(self, phase: str) -> list[ActorGroup]:
        """The groups of roles taking part in `phase` ("score", "annotate", "train"), in declared order."""
        return [self.groups[r.name] for r in self.plan.roles_in(phase)]

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        self.groups = {}
        for pg in self._pgs.values():
            remove_placement_group(pg)
        self._pgs = {}
