"""Faults on a simulated cluster, for tests, scripts/chaos.py and the recovery benchmark.

    cluster = SimCluster([1, 1, 1])               # ray.cluster_utils.Cluster: one process tree per "node"
    faults = [Fault(1, "kill_rollout"), Fault(2, "remove_node"), Fault(3, "add_node")]
    result = run_rl(out_dir, flags, faults, cluster)   # an in-process `swiftray rlhf`, faults injected
    result["train"], result["ledger"], result["injected"]

Faults come from outside the driver, as an operator's `kill -9` or a lost machine would: the injector
wraps a few of the driver's methods to act at the moment a step has work in flight (after a request's
chunks are issued, after the annotate calls are issued, before the policy trains) and SIGKILLs the
actor's process, or removes or adds a node. Nothing here is imported by a run that injects nothing.

    kill_rollout    an engine, while the step's chunks are being generated
    kill_reward     the reward actor, while its annotate calls wait on the step's rollouts
    kill_reference  the reference actor, while the step's annotate calls are in flight
    kill_policy     the last policy rank, as the step starts training
    remove_node     the node with most engines (never the head, never the policy's), chunks in flight
    add_node        a node of `add_cpus` CPUs, before the step's rollouts are requested
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

FAULT_KINDS = ("kill_rollout", "kill_reward", "kill_reference", "kill_policy", "remove_node", "add_node")
# Ray declares a node dead after health_check_failure_threshold missed checks: seconds, not Ray's minute.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                      "health_check_timeout_ms": 500}


class SimCluster:
    """Several Ray nodes on this machine (`ray.cluster_utils.Cluster`), the driver connected to them."""

    def __init__(self, node_cpus: list[float], object_store_bytes: int = 200 << 20):
        from ray.cluster_utils import Cluster

        repo = str(Path(__file__).resolve().parent.parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        self.object_store_bytes = object_store_bytes
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": node_cpus[0], "object_store_memory": object_store_bytes, "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS})
        for cpus in node_cpus[1:]:
            self.add_node(cpus)
        ray.init(address=self.cluster.address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1",
                                           "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}})

    def add_node(self, cpus: float) -> Any:
        return self.cluster.add_node(num_cpus=cpus, object_store_memory=self.object_store_bytes)

    def remove_node(self, node_id: str) -> None:
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)  # SIGKILL every process of the node

    def worker_node_ids(self) -> list[str]:
        return [n.node_id for n in self.cluster.worker_nodes]

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


@dataclass
class Fault:
    step: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault {self.kind!r}: expected one of {FAULT_KINDS}")


@dataclass
class Injector:
    """Installs itself on the driver's classes for one run; `injected` records what it did and when."""

    cluster: SimCluster | None
    faults: list[Fault]
    add_cpus: float = 2.0
    injected: list[dict[str, Any]] = field(default_factory=list)
    pids: dict[Any, int] = field(default_factory=dict)  # actor id -> process id
    step: int = 0  # the training step whose rollouts were collected last (the step now under way)
    rl: Any = None

    def due(self, step: int | None, kinds: tuple[str, ...]) -> list[Fault]:
        hits = [f for f in self.faults if f.step == step and f.kind in kinds]
        for f in hits:
            self.faults.remove(f)
        return hits

    def learn_pids(self, actors: list[Any]) -> None:
        new = [a for a in actors if a._actor_id not in self.pids]
        for actor, info in zip(new, ray.get([a.ping.remote() for a in new])):
            self.pids[actor._actor_id] = info["pid"]

    def kill(self, kind: str, actor: Any, step: int) -> None:
        pid = self.pids[actor._actor_id]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it went with a node removed this step, and is not replaced yet
            self.injected.append({"step": step, "kind": kind, "pid": pid, "skipped": "its process was already gone"})
            return
        self.injected.append({"step": step, "kind": kind, "pid": pid, "at": time.time()})

    def act(self, fault: Fault) -> None:
        roles = self.rl.roles
        if fault.kind == "kill_rollout":
            self.kill(fault.kind, roles["rollout"].actors[0], fault.step)
        elif fault.kind == "kill_reward":
            self.kill(fault.kind, roles["reward"].actors[0], fault.step)
        elif fault.kind == "kill_reference":
            self.kill(fault.kind, roles["reference"].actors[0], fault.step)
        elif fault.kind == "kill_policy":
            self.kill(fault.kind, roles["policy"].actors[-1], fault.step)
        elif fault.kind == "remove_node":
            self.remove_node(fault.step)
        elif fault.kind == "add_node":
            node = self.cluster.add_node(self.add_cpus)
            self.injected.append({"step": fault.step, "kind": fault.kind, "node": node.node_id, "at": time.time()})

    def remove_node(self, step: int) -> None:
        roles = self.rl.roles
        policy_nodes = set(ray.get([a.node_id.remote() for a in roles["policy"].actors]))
        engines = roles["rollout"].actors
        counts: dict[str, int] = {}
        for engine in engines:
            node = self.rl.supervisor.engine_nodes.get(engine._actor_id)
            if node in self.cluster.worker_node_ids() and node not in policy_nodes:
                counts[node] = counts.get(node, 0) + 1
        if not counts:
            self.injected.append({"step": step, "kind": "remove_node", "skipped": "no engine off the policy's node"})
            return
        node = max(counts, key=counts.get)
        self.cluster.remove_node(node)
        self.injected.append({"step": step, "kind": "remove_node", "node": node, "engines": counts[node],
                              "at": time.time()})

    # --- the wrapped driver methods -------------------------------------------------------------------
    def install(self, monkeypatch: Any) -> None:
        from swiftray.controller import rl, supervision, work

        injector = self
        real_init, real_generate, real_train = rl.RLStep.__init__, rl.RLStep.generate, rl.RLStep.train
        real_collect = rl.RLStep.collect
        real_start, real_continue = work.Work.start, work.Work.continue_with
        real_replace = supervision.Supervisor._start

        def init(self, *a, **k):
            real_init(self, *a, **k)
            injector.rl = self
            injector.learn_pids([x for g in self.roles.groups.values() for x in g.actors])

        def generate(self, rows, params, seed, ids=None, step=None, resample=0):
            for fault in injector.due(step, ("add_node",)) if not resample else []:
                injector.act(fault)
            return real_generate(self, rows, params, seed, ids, step, resample)

        def start(self, chunks, step, resample=0):
            request = real_start(self, chunks, step, resample)
            if not resample:
                for fault in injector.due(step, ("kill_rollout", "kill_reward", "remove_node")):
                    injector.act(fault)
            return request

        def collect(self, request):
            if request.step is not None and not request.resample:
                injector.step = request.step
            return real_collect(self, request)

        def continue_with(self, refs, stages):
            request = real_continue(self, refs, stages)
            if stages and injector.rl is not None:
                for fault in injector.due(injector.step, ("kill_reference",)):
                    injector.act(fault)
            return request

        def train(self, shards):
            for fault in injector.due(injector.step, ("kill_policy",)):
                injector.act(fault)
            return real_train(self, shards)

        def start_actor(self, role, rank, strategy=None, **kwargs):
            actor = real_replace(self, role, rank, strategy, **kwargs)
            injector.learn_pids([actor])
            return actor

        monkeypatch.setattr(rl.RLStep, "__init__", init)
        monkeypatch.setattr(rl.RLStep, "generate", generate)
        monkeypatch.setattr(rl.RLStep, "train", train)
        monkeypatch.setattr(rl.RLStep, "collect", collect)
        monkeypatch.setattr(work.Work, "start", start)
        monkeypatch.setattr(work.Work, "continue_with", continue_with)
        monkeypatch.setattr(supervision.Supervisor, "_start", start_actor)


def run_rl(out_dir: Path, flags: list[str], faults: list[Fault] | None = None, cluster: SimCluster | None = None,
           add_cpus: float = 2.0) -> dict[str, Any]:
    """An in-process `swiftray rlhf` with `flags`, `faults` injected; its logs, ledger and what was done."""
    from swiftray.arguments import RlhfArguments
    from swiftray.cli_parser import parse_args
    from swiftray.controller import ledger as ledger_file
    from swiftray.controller import rl

    injector = Injector(cluster, list(faults or []), add_cpus)
    patcher = _Patcher()
    injector.install(patcher)
    start = time.time()
    try:
        run_dir = rl.run_rlhf(parse_args(RlhfArguments, [*flags, "--output_dir", str(out_dir)]))
    finally:
        patcher.undo()
    lines = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return {"run_dir": str(run_dir), "seconds": time.time() - start,
            "train": [line for line in lines if "train/loss" in line],
            "ledger": ledger_file.read(run_dir / ledger_file.LEDGER), "injected": injector.injected,
            "not_injected": [vars(f) for f in injector.faults]}


class _Patcher:
    """setattr with undo (pytest's monkeypatch, without pytest)."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []

    def setattr(self, owner: Any, name: str, value: Any) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def undo(self) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)
        self.saved = []


def random_faults(steps: int, count: int, seed: int, kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """`count` faults at random steps 1..steps (several may share a step), kinds drawn from `kinds`."""
    rng = random.Random(seed)
    return sorted((Fault(rng.randint(1, steps), rng.choice(kinds)) for _ in range(count)),
                  key=lambda f: (f.step, FAULT_KINDS.index(f.kind)))
