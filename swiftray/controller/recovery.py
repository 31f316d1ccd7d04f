"""The policy's way back after it loses a rank: its ranks hold optimizer state, so a lost rank takes the
whole group (and every role trained beside it) back to the last checkpoint, in memory or on disk.

    keeper.start(step, state)            # the run's starting point: step 0, or the checkpoint it resumed
    keeper.snapshot(step, state)         # every --memory_checkpoint_steps: the policy's state in Ray's store
    keeper.saved(step, path, state)      # every checkpoint the loop writes to disk
    state = keeper.recover(err)          # after a failed step: None if every trained rank is still there
                                         # (then the error is the run's), else the state the loop goes on from

`state` is the loop's own (the trainer_state.json dict: step, sampler position, best metric): the loop
puts it back and goes on from its step, re-syncing the engines. In sync mode the run then reaches the
weights an uninterrupted run from that checkpoint reaches (rollout seeds depend on step and chunk only,
and the policy's RNG comes back with its state). A snapshot lives in the object store of rank 0's node:
when that node is gone, the disk checkpoint is used.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray

from swiftray.actors.group import ActorGroup
from swiftray.controller.roles import RunningRoles
from swiftray.paths import absolute
from swiftray.plan import RunPlan

logger = logging.getLogger("swiftray")

PING_TIMEOUT_S = 10.0


class PolicyKeeper:
    def __init__(self, plan: RunPlan, roles: RunningRoles, trained: dict[str, ActorGroup]):
        self.plan, self.roles, self.trained = plan, roles, trained
        c = plan.cluster_plan
        self.max_restarts, self.every = c.max_restarts, c.memory_checkpoint_steps
        if self.every and set(trained) != {"policy"}:
            logger.warning("--memory_checkpoint_steps: roles trained beside the policy (%s) have no memory "
                           "snapshot; a lost rank goes back to the last checkpoint on disk",
                           ", ".join(n for n in trained if n != "policy"))
            self.every = 0
        self.restarts = 0
        self.memory: tuple[int, dict, list] | None = None  # (step, loop state, per-rank snapshot refs)
        self.disk: tuple[int, str | None, dict] | None = None  # (step, checkpoint path or None: the start)
        self.events: list[dict[str, Any]] = []

    def start(self, step: int, state: dict[str, Any], checkpoint: str | None = None) -> None:
        self.disk = (step, checkpoint, dict(state))

    def snapshot_now(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def snapshot(self, step: int, state: dict[str, Any]) -> None:
        refs = self.trained["policy"].call_all("snapshot")
        ray.wait(refs, num_returns=len(refs))  # taken now; the previous one may go
        self.memory = (step, dict(state), refs)

    def saved(self, step: int, path: Path, state: dict[str, Any]) -> None:
        self.disk = (step, str(path), dict(state))

    def lost_ranks(self) -> list[str]:
        """Trained actors that do not answer (dead, or stuck in a collective with a dead one)."""
        lost = []
        for name, group in self.trained.items():
            pings = [a.ping.remote() for a in group.actors]
            ready, _ = ray.wait(pings, num_returns=len(pings), timeout=PING_TIMEOUT_S)
            for rank, ref in enumerate(pings):
                try:
                    if ref not in ready:
                        raise TimeoutError
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, TimeoutError):
                    lost.append(f"{name} rank {rank}")
        return lost

    def recover(self, err: BaseException) -> dict[str, Any] | None:
        """After `err` broke a step: None when every trained rank answers (the error is the run's);
        else restart the trained groups from the latest snapshot or checkpoint and return its loop state.
        Raises when --max_restarts restarts are spent."""
        lost = self.lost_ranks()
        if not lost:
            return None
        start = time.time()
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"lost {', '.join(lost)}; the policy was restarted {self.max_restarts} time(s) "
                               "already (--max_restarts)") from err
        logger.warning("lost %s (%s); restarting the trained roles from their last checkpoint (%d of %d)",
                       ", ".join(lost), type(err).__name__, self.restarts, self.max_restarts)
        for name, group in self.trained.items():
            group.restart()
            role = self.plan.role(name)
            ray.get(group.call_all("setup", role.config))
            if role.threads_share is not None:
                ray.get(group.call_all("use_cores", role.threads_share))
        step, state, source = self._restore()
        self.events.append({"kind": "policy_restarted", "role": "policy", "lost": lost, "from_step": step,
                            "source": source, "seconds": round(time.time() - start, 3), "at": time.time()})
        logger.warning("policy restarted from %s at step %d in %.1fs", source, step, time.time() - start)
        return state

    def _restore(self) -> tuple[int, dict[str, Any], str]:
        disk_step = self.disk[0] if self.disk else 0
        if self.memory is not None and self.memory[0] >= disk_step:
            step, state, refs = self.memory
            try:
                ray.get(self.trained["policy"].call_all_ranked("restore_snapshot", refs, refs[0]))
                return step, state, "memory"
            except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as err:
                logger.warning("the memory snapshot of step %d was lost with its node (%s); using the disk",
                               step, type(err).__name__)
                self.memory = None
        step, path, state = self.disk or (0, None, {})
        if path is not None:
            ray.get([ref for name, group in self.trained.items()
                     for ref in group.call_all("load_checkpoint",
                                               absolute(Path(path) if name == "policy" else Path(path) / name))])
            return step, state, path
        return step, state, "the start"

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
