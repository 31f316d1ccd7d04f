"""Cluster runs on a simulated 3-node cluster (ray.cluster_utils.Cluster, every node on this machine):

    python benchmarks/cluster_bench.py [--quick]

1. Recovery: a GRPO run (tiny model, 2 engines) with one fault per step; for each fault kind, the
   seconds its recovery took (the supervisor's or the policy keeper's own measure: from the moment the
   loss was seen to a set-up replacement at the current weights) and how much longer its step took than
   the fault-free run's same step.
2. Weight sync off the policy's node: policy rank 0 on one node, N hf engines on another; one sync by
   broadcast (collective_sync.py, gloo) against one by object-store buckets (export_weights + every
   engine's update_weights), the median of 5 after a warm-up, for two model sizes.
3. Generation throughput against the number of engines: the same 32 prompts x 4 completions handed out
   by the driver's queue (controller/work.py) to 1, 2 and 4 engines.

Writes the section between the cluster markers of benchmarks/RESULTS.md (and the raw figures to
benchmarks/work/cluster.json). The machine has 2 cores: every "node" shares them, so the figures show
the mechanisms' costs, not a real cluster's speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent


def recovery(cluster, model: str, work: Path) -> dict:
    from scripts.chaos import PLUGIN, flags
    from swiftray.chaos import Fault, run_rl

    plugin = work / "bench_reward.py"
    plugin.write_text(PLUGIN)
    steps = 7
    clean = run_rl(work / "clean", flags(model, plugin, steps, 0))
    faults = [Fault(2, "kill_rollout"), Fault(3, "kill_reward"), Fault(4, "kill_reference"), Fault(5, "kill_policy"),
              Fault(6, "add_node"), Fault(7, "remove_node")]
    faulty = run_rl(work / "faults", flags(model, plugin, steps, 0), faults, cluster, add_cpus=2)
    step_s = {}
    for run, name in ((clean, "clean"), (faulty, "faulty")):
        ends = [line["train/time/generate_and_score_s"] + line["train/time/train_s"] + line["train/time/sync_weights_s"]
                for line in run["train"]]
        step_s[name] = ends
    rows = []
    for fault in faulty["injected"]:
        line = next(x for x in faulty["ledger"] if x["step"] == fault["step"])
        events = [f for f in line["faults"]]
        seconds = [f["seconds"] for f in events]
        rows.append({"kind": fault["kind"], "step": fault["step"], "events": [f["kind"] for f in events],
                     "recovery_s": round(sum(seconds), 2),
                     "extra_step_s": round(step_s["faulty"][fault["step"] - 1] - step_s["clean"][fault["step"] - 1], 2)})
    same = max(abs(a["train/loss"] - b["train/loss"]) for a, b in zip(faulty["train"], clean["train"]))
    return {"rows": rows, "max_loss_gap": same}


def sync_figures(model: str, engines: int, repeats: int = 5) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from swiftray.actors.group import ActorGroup
    from swiftray.actors.policy import PolicyActor
    from swiftray.actors.rollout import RolloutActor

    policy = ActorGroup(PolicyActor, 1, num_cpus_per_worker=0.5, name="bench-policy")
    node = ray.get(policy.actors[0].node_id.remote())
    other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != node and n["Resources"].get("CPU"))
    strategy = NodeAffinitySchedulingStrategy(other, soft=False)
    actors = [ray.remote(RolloutActor).options(num_cpus=0.1, scheduling_strategy=strategy).remote()
              for _ in range(engines)]
    ray.get([a.init_distributed.remote(1, 1, "", 0, None, 1) for a in actors])
    ray.get(policy.call_all("setup", {"model_dir": model, "train_type": "full"})
            + [a.setup.remote({"model_dir": model}) for a in actors])
    addr, port = ray.get(policy.actors[0].get_master_address.remote())
    ray.get([policy.actors[0].join_weight_group.remote(addr, port, engines + 1, "gloo", 1)]
            + [a.join_weight_group.remote(addr, port, r, engines + 1, "gloo", 1) for r, a in enumerate(actors, 1)])
    out = {"collective": [], "object_store": []}
    for i in range(repeats + 1):
        t = time.perf_counter()
        nbytes, *_ = ray.get([policy.actors[0].broadcast_weights.remote(i)] + [a.receive_weights.remote() for a in actors])
        collective = time.perf_counter() - t
        t = time.perf_counter()
        export = policy.actors[0].export_weights.remote(64 << 20)
        ray.get([a.update_weights.remote(i, export) for a in actors])
        object_store = time.perf_counter() - t
        if i:
            out["collective"].append(collective)
            out["object_store"].append(object_store)
    for a in actors:
        ray.kill(a)
    policy.shutdown()
    return {"engines": engines, "mb": nbytes / 2**20, **{k: statistics.median(v) for k, v in out.items()}}


def throughput(model: str, engines: int) -> dict:
    import ray

    from swiftray.actors.group import ActorGroup
    from swiftray.actors.rollout import RolloutActor
    from swiftray.controller.work import Chunk, Work
    from swiftray.models.generation import SamplingParams
    from swiftray.models.loader import load_tokenizer

    group = ActorGroup(RolloutActor, engines, num_cpus_per_worker=0.25, name="bench-rollout", backend=None)
    ray.get(group.call_all("setup", {"model_dir": model}))
    ray.get(group.call_all("use_cores", 1.0 / engines))

    class Pool:
        def actors(self, role):
            return group.actors

    tok = load_tokenizer(model)
    rows = [{"prompt_ids": tok.encode(f"{i} + {i % 7} =")} for i in range(32)]
    params = SamplingParams(max_new_tokens=32, n=4, temperature=1.0)
    work = Work(Pool())
    work.finish(work.start([Chunk(index=0, stages=["rollout"], rows=rows[:4], params=params, seed=0)], None))  # warm
    t = time.perf_counter()
    chunks = [Chunk(index=j, stages=["rollout"], rows=rows[j * 4:(j + 1) * 4], params=params, seed=j) for j in range(8)]
    refs = work.finish(work.start(chunks, None))
    seconds = time.perf_counter() - t
    tokens = sum(len(c) for batch in ray.get(refs) for c in batch.completion_ids)
    group.shutdown()
    return {"engines": engines, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def write(results: dict) -> None:
    r = results
    lines = ["## 6. Cluster runs: recovery, weight sync across nodes, engines",
             "", f"Written by `python benchmarks/cluster_bench.py` on a simulated 3-node cluster "
             f"(`ray.cluster_utils.Cluster`, every node on this 2-core machine; load average at start {r['load']}). "
             "Every node shares the same 2 cores, so these show the mechanisms' costs, not a cluster's speed-up.", "",
             "Recovery (GRPO, tiny model, 2 engines, one fault per step; `recovery s`: from the loss seen to a set-up "
             "replacement at the current weights, or the policy restarted from its snapshot; `extra step s`: that "
             "step's time minus the fault-free run's same step, from the step's own timings: for kill_policy that is "
             "the redone step, the failed try and the restore being in `recovery s`):", "",
             "| fault | step | recovery events | recovery s | extra step s |", "|---|---|---|---|---|"]
    for row in r["recovery"]["rows"]:
        lines.append(f"| {row['kind']} | {row['step']} | {', '.join(row['events']) or '-'} | {row['recovery_s']:.1f} "
                     f"| {row['extra_step_s']:.1f} |")
    lines += ["", f"Largest loss difference from the fault-free run over all steps: {r['recovery']['max_loss_gap']:.1e}.",
              "", "Weight sync, policy rank 0 on one node and the engines on another (median of 5 syncs after a warm-up):",
              "", "| model MB | engines | broadcast (gloo) s | object store s | object store / broadcast |",
              "|---|---|---|---|---|"]
    for row in r["sync"]:
        lines.append(f"| {row['mb']:.0f} | {row['engines']} | {row['collective']:.3f} | {row['object_store']:.3f} | "
                     f"{row['object_store'] / row['collective']:.2f} |")
    lines += ["", "Generation throughput against the number of engines (32 prompts x 4 completions x 32 new tokens, "
              "chunks of 4 prompts from the driver's queue):", "", "| engines | tokens | seconds | tokens/s |",
              "|---|---|---|---|"]
    for row in r["throughput"]:
        lines.append(f"| {row['engines']} | {row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} |")
    write_section("cluster_bench", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model size, 1 and 2 engines")
    parser.add_argument("--write_only", action="store_true", help="rewrite RESULTS.md from benchmarks/work/cluster.json")
    opts = parser.parse_args()
    if opts.write_only:
        write(json.loads((HERE / "work" / "cluster.json").read_text()))
        return
    from swiftray.chaos import SimCluster
    from swiftray.models.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="swiftray-cluster-bench-"))
    tiny = str(make_tiny_model(work / "tiny"))
    models = [tiny] if opts.quick else [tiny, str(make_tiny_model(work / "medium", hidden_size=512, num_layers=8,
                                                                  num_heads=8, intermediate_size=1536))]
    results = {"load": [round(x, 2) for x in os.getloadavg()]}
    cluster = SimCluster([0, 2, 2])
    try:
        results["sync"] = [sync_figures(m, n) for m in models for n in ((1, 2) if opts.quick else (1, 2, 4))]
        results["throughput"] = [throughput(tiny, n) for n in (1, 2, 4)]
        results["recovery"] = recovery(cluster, tiny, work)
    finally:
        cluster.shutdown()
    (HERE / "work").mkdir(exist_ok=True)
    (HERE / "work" / "cluster.json").write_text(json.dumps(results, indent=1, default=str))
    write(results)
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
