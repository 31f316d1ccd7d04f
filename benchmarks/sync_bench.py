"""Weight sync: one policy -> rollout sync through Ray's object store, against an in-process copy.

    python benchmarks/sync_bench.py --models DIR1 DIR2 ... --repeats 3

For each (randomly initialised) model: a PolicyActor (rank 0 of a one-worker group) and a
RolloutActor (hf engine) load it; one sync is what `swiftray rlhf` does after every step:

    export = policy.export_weights.remote(bucket_bytes)   # rank 0 cuts its state into buckets, ray.put each
    rollout.update_weights.remote(version, export)        # Ray hands it the export's result; it loads it

timed for both transports: the object store, and the policy's shared-memory buffers
(`export_weights(shared_memory=True)`, what `swiftray rlhf` uses when all roles share a node). The
shared-memory sync is one copy: the policy copies its weights into one of two /dev/shm buffers (in
turn, both pre-faulted), and the rollout's hf engine makes its parameters views of that buffer instead
of copying them out (`HFEngine.load_weights(share=True)`; see swiftray/actors/shared_weights.py).
With --repeats 3 or more, both buffers are written again after the warm-up sync.

The baseline is `dst.copy_(src)` for every tensor of the same state dict, in one process: the least
a one-copy sync can cost, so sync / copy speed is at most 1 (less the two actor calls' overhead).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import emit, median  # noqa: E402

BUCKET_BYTES = 64 << 20  # what swiftray rlhf uses (controller/rl.py SYNC_BUCKET_BYTES)


def in_process_copy(shapes: dict[str, tuple[list[int], Any]], repeats: int, threads: int) -> list[float]:
    """Seconds to copy_ every tensor of a state dict into preallocated tensors of the same shapes,
    with whichever of 1 or `threads` torch threads is faster here (the baseline at its best)."""
    import torch

    src = {k: torch.randn(shape).to(dtype) for k, (shape, dtype) in shapes.items()}
    dst = {k: torch.empty_like(v) for k, v in src.items()}
    best: list[float] = []
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for k, v in src.items():
                dst[k].copy_(v)
            times.append(time.perf_counter() - start)
        if not best or median(times[1:]) < median(best):
            best = times[1:]
    torch.set_num_threads(threads)
    del src, dst
    gc.collect()
    return best


def measure(model_dir: str, repeats: int, threads: int) -> dict[str, Any]:
    import ray
    import torch
    from safetensors import safe_open

    from swiftray.actors.group import ActorGroup
    from swiftray.actors.policy import PolicyActor
    from swiftray.actors.rollout import RolloutActor

    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                shapes[key] = (t.get_shape(), getattr(torch, {"F32": "float32", "BF16": "bfloat16"}[t.get_dtype()]))
    copy_s = in_process_copy(shapes, repeats, threads)

    policy = ActorGroup(PolicyActor, 1, num_cpus_per_worker=1, name="policy")
    rollout = ActorGroup(RolloutActor, 1, num_cpus_per_worker=0.5, name="rollout")
    try:
        counts = ray.get(policy.call_all("setup", {"model_dir": model_dir, "total_steps": 1}))[0]
        ray.get(rollout.call_all("setup", {"model_dir": model_dir, "engine": "hf"}))
        out: dict[str, Any] = {}
        # object_store: ray.put of 64 MiB buckets (swiftray's path across nodes, and its only path
        # before this benchmark); shared_memory: the policy's /dev/shm buffers (same node).
        for transport in ("object_store", "shared_memory"):
            sync_s, export_s, sent_bytes = [], [], 0
            for version in range(repeats + 1):  # the first sync warms up both sides
                start = time.perf_counter()
                export = policy.call_all("export_weights", BUCKET_BYTES,
                                         shared_memory=transport == "shared_memory")[0]
                update = rollout.call_all("update_weights", version, export)  # as controller/weight_sync.py does
                ray.wait([export])
                exported = time.perf_counter()
                ray.get(update)
                end = time.perf_counter()
                buckets = ray.get(export)
                if version:
                    sync_s.append(end - start)
                    export_s.append(exported - start)
                if not sent_bytes:
                    sent_bytes = (buckets[0]["size"] if transport == "shared_memory" else
                                  sum(t.numel() * t.element_size() for b in ray.get(buckets) for t in b.values()))
                del buckets
            out[transport] = {"sync_s": median(sync_s), "export_s": median(export_s), "runs": sync_s,
                              "bytes": sent_bytes, "gbps": sent_bytes / median(sync_s) / 1e9}
    finally:
        policy.shutdown()
        rollout.shutdown()
    copy_bytes = sum(torch.Size(s).numel() * torch.tensor([], dtype=d).element_size() for s, d in shapes.values())
    return {"model": model_dir, "num_params": counts["num_params"], "copy_bytes": copy_bytes,
            "copy_s": median(copy_s), "copy_runs": copy_s, "copy_gbps": copy_bytes / median(copy_s) / 1e9, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    opts = p.parse_args()
    from swiftray.cluster import init_ray

    init_ray()
    rows = []
    for model_dir in opts.models:
        rows.append(measure(model_dir, opts.repeats, opts.threads))
        gc.collect()
    emit({"rows": rows})


if __name__ == "__main__":
    main()
