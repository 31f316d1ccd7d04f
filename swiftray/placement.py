"""Where every role's workers go: the cluster's nodes, and the placement groups and bundles of a run.

GPU clusters. Each policy rank takes one GPU: a bundle {GPU: 1, CPU: c} of the policy's placement
group. Rollout engines (each `--vllm_tensor_parallel_size` GPUs) get GPUs of their own when the
cluster has enough for both; otherwise they share the policy's GPUs (ms-swift's colocate mode:
engine i sits in the bundles of ranks i*tp .. i*tp+tp-1) and the step sleeps and wakes them around
training. Roles that want a GPU (the reference model, a critic, a teacher) sit in the policy's
bundles too: one per GPU, or one per rank. Actors sharing a bundle split its GPU evenly (Ray's
fractional GPUs: accounting only; memory is vLLM's --vllm_gpu_memory_utilization and the
sleep/offload calls). CPU-only roles (the reward functions) get a CPU bundle of their own.

CPU clusters. Every role gets its own placement group, sized in logical CPUs so that all roles fit
together (Ray waits forever, without an error, for a request that cannot fit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from swiftray.arguments import ArgumentError


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: int


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    source: str  # where the figures come from: a running Ray cluster, or the launch environment

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    def describe(self) -> str:
        per_node = ", ".join(f"{n.cpus:g} CPUs + {n.gpus} GPUs" for n in self.nodes)
        return f"{len(self.nodes)} node(s): {per_node} ({self.source})"


def local_cpus() -> int:
    """Logical CPUs of a local Ray that swiftray starts: at least 4, so that the roles of a small run
    place on a 2-core machine (they are a scheduling budget, not threads)."""
    return max(4, os.cpu_count() or 1)


def cluster_from_ray() -> Cluster:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = tuple(Node(cpus=float(n["Resources"].get("CPU", 0)), gpus=int(n["Resources"].get("GPU", 0)))
                  for n in ray.nodes() if n.get("Alive"))
    return Cluster(nodes, f"Ray cluster at {ray.get_runtime_context().gcs_address}")


def cluster_from_environment() -> Cluster:
    """The nodes a launch describes without asking Ray: NNODES nodes, each with the GPUs of
    CUDA_VISIBLE_DEVICES (or that torch sees) and the CPUs a local Ray would get."""
    nnodes = int(os.environ.get("NNODES", "1") or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip()])
        where = f"CUDA_VISIBLE_DEVICES={visible}"
    else:
        import torch

        gpus = torch.cuda.device_count()
        where = f"{gpus} CUDA device(s) visible"
    return Cluster(tuple(Node(float(local_cpus()), gpus) for _ in range(nnodes)),
                   f"launch environment: NNODES={nnodes}, {where}")


def detect_cluster() -> Cluster:
    """The Ray cluster when this process is connected to one, else what the environment describes."""
    import ray

    return cluster_from_ray() if ray.is_initialized() else cluster_from_environment()


@dataclass(frozen=True)
class Demand:
    """What a role asks for, before layout."""

    name: str
    num_workers: int
    gpus_per_worker: int  # 0: CPU only; rollout engines ask for their tensor-parallel size
    num_cpus: float  # logical CPUs per worker
    colocatable: bool = True  # may share the policy's GPUs


@dataclass(frozen=True)
class Placement:
    """Where one role's workers go."""

    group: str  # the placement group they run in (their own, or the policy's when sharing its GPUs)
    bundles: tuple[int, ...]  # each worker's bundle index in that group
    num_cpus: float  # per worker
    num_gpus: float  # per worker: 1 (or tp) when alone on its GPUs, a fraction when sharing, 0 on CPU
    devices: tuple[str, ...]  # each worker's planned device(s), e.g. "node0:gpu3", for --print_plan

    @property
    def num_workers(self) -> int:
        return len(self.bundles)


@dataclass(frozen=True)
class Layout:
    groups: dict[str, tuple[dict[str, float], ...]]  # placement group name -> its bundles
    placements: dict[str, Placement]
    colocated: tuple[str, ...]  # roles that share the policy's GPUs


def lay_out(cluster: Cluster, policy: Demand, others: list[Demand]) -> Layout:
    """Place the policy and every other role on `cluster`; raise ArgumentError (naming what asked for
    what, and what the cluster has) when they cannot all fit."""
    if cluster.gpus == 0:
        return _lay_out_cpu(cluster, [policy, *others])
    return _lay_out_gpu(cluster, policy, others)


def _lay_out_cpu(cluster: Cluster, demands: list[Demand]) -> Layout:
    asked = sum(d.num_workers * d.num_cpus for d in demands)
    if asked > cluster.cpus + 1e-9:
        detail = "; ".join(f"{d.name}: {d.num_workers} x {d.num_cpus:g} CPU" for d in demands)
        raise ArgumentError(f"the roles ask for {asked:g} logical CPUs ({detail}) but the cluster has "
                            f"{cluster.cpus:g} ({cluster.describe()}); lower --num_cpus_per_worker or the "
                            "number of workers, or add nodes")
    groups, placements = {}, {}
    for d in demands:
        groups[d.name] = tuple({"CPU": d.num_cpus} for _ in range(d.num_workers))
        placements[d.name] = Placement(d.name, tuple(range(d.num_workers)), d.num_cpus, 0.0,
                                       tuple("cpu" for _ in range(d.num_workers)))
    return Layout(groups, placements, ())


def _gpu_names(cluster: Cluster, first: int, count: int) -> list[str]:
    """Names of GPUs first .. first+count-1, counting node by node (how Ray's PACK fills nodes)."""
    names = [f"node{i}:gpu{g}" for i, node in enumerate(cluster.nodes) for g in range(node.gpus)]
    return names[first:first + count]


def _lay_out_gpu(cluster: Cluster, policy: Demand, others: list[Demand]) -> Layout:
    ranks = policy.num_workers
    if cluster.gpus < ranks:
        raise ArgumentError(f"{ranks} policy ranks (NPROC_PER_NODE x NNODES) need {ranks} GPUs; "
                            f"the cluster has {cluster.gpus} ({cluster.describe()})")
    own = [d for d in others if d.gpus_per_worker and not d.colocatable]
    shared = [d for d in others if d.gpus_per_worker and d.colocatable]
    cpu_only = [d for d in others if not d.gpus_per_worker]
    free = cluster.gpus - ranks - sum(d.num_workers * d.gpus_per_worker for d in own)
    if free < 0:
        raise ArgumentError(f"the roles need {cluster.gpus - free} GPUs; the cluster has {cluster.gpus} "
                            f"({cluster.describe()})")
    # A role whose workers need several GPUs each (tensor-parallel engines) gets its own GPUs when
    # there are enough beside the policy's; otherwise it shares them.
    for d in sorted(shared, key=lambda d: -d.gpus_per_worker):
        need = d.num_workers * d.gpus_per_worker
        if d.gpus_per_worker > 1 and need <= free:
            own.append(d)
            free -= need
    rollout = next((d for d in shared if d.name == "rollout"), None)
    if rollout is not None and rollout not in own and rollout.num_workers * rollout.gpus_per_worker <= free:
        own.append(rollout)  # engines on GPUs of their own: no sleeping, no sharing
        free -= rollout.num_workers * rollout.gpus_per_worker
    shared = [d for d in shared if d not in own]

    # Which actors sit in each of the policy's bundles (one per GPU).
    residents: list[list[tuple[str, float]]] = [[("policy", policy.num_cpus)] for _ in range(ranks)]
    bundles_of: dict[str, list[int]] = {}
    for d in shared:
        span = d.gpus_per_worker or 1
        if d.num_workers * span > ranks:
            raise ArgumentError(
                f"{d.name}: {d.num_workers} worker(s) x {span} GPU(s) do not fit on the policy's {ranks} GPUs and "
                f"the cluster has {max(free, 0)} more ({cluster.describe()}); lower --num_infer_workers or "
                "--vllm_tensor_parallel_size, or add GPUs")
        bundles_of[d.name] = [i * span for i in range(d.num_workers)]
        for i in range(d.num_workers):
            for b in range(i * span, (i + 1) * span):
                residents[b].append((d.name, d.num_cpus if b == i * span else 0.0))

    groups: dict[str, tuple[dict[str, float], ...]] = {
        "policy": tuple({"CPU": round(sum(c for _, c in r), 2), "GPU": 1.0} for r in residents)}
    fraction = [round(int(100 / len(r)) / 100, 2) for r in residents]
    policy_gpus = _gpu_names(cluster, 0, ranks)
    placements = {"policy": Placement("policy", tuple(range(ranks)), policy.num_cpus,
                                      min(fraction) if shared else 1.0, tuple(policy_gpus))}
    for d in shared:
        span = d.gpus_per_worker or 1
        placements[d.name] = Placement(
            "policy", tuple(bundles_of[d.name]), d.num_cpus, min(fraction[b] for b in bundles_of[d.name]),
            tuple("+".join(policy_gpus[b:b + span]) for b in bundles_of[d.name]))
    next_gpu = ranks
    for d in own:
        groups[d.name] = tuple({"CPU": d.num_cpus, "GPU": float(d.gpus_per_worker)} for _ in range(d.num_workers))
        names = _gpu_names(cluster, next_gpu, d.num_workers * d.gpus_per_worker)
        span = d.gpus_per_worker
        placements[d.name] = Placement(d.name, tuple(range(d.num_workers)), d.num_cpus, float(span),
                                       tuple("+".join(names[i * span:(i + 1) * span]) for i in range(d.num_workers)))
        next_gpu += d.num_workers * span
    for d in cpu_only:
        groups[d.name] = tuple({"CPU": d.num_cpus} for _ in range(d.num_workers))
        placements[d.name] = Placement(d.name, tuple(range(d.num_workers)), d.num_cpus, 0.0,
                                       tuple("cpu" for _ in range(d.num_workers)))
    return Layout(groups, placements, tuple(d.name for d in shared))
