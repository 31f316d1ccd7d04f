"""Memory per role: peak resident memory of swiftray's driver, each role's actors and Ray's daemons,
beside TRL's single process, as the completions per step grow.

    python benchmarks/memory_bench.py [--completions 8 16 32 64 --steps 3]

Each point is one GRPO run of grpo_bench.py (same model, prompts and settings as section 2; one prompt
x N completions per step, 64 new tokens) in its own process tree; the orchestrator samples every
process's RSS four times a second and sums it per role (harness.process_role: the driver, `policy`,
`rollout`, `reference`, `reward` actors by their Ray process titles, Ray's daemons and agents, the
Ray workers that run the driver's small tasks (rl_tasks.py) or wait idle). A process counts for the most
specific role it was seen with (harness.memory_peaks): an actor's worker is titled `ray::IDLE` while it
imports torch at start-up.
RSS counts shared pages (torch's libraries, the /dev/shm weight buffers) once per process, so the sums
over-state what the machine gives; TRL's figure is its one process's RSS.

The driver never holds rollout data (the trainers get ObjectRefs), so its peak should stay flat as
the completions grow: the target is within 10% from 8 to 64. Writes its section of RESULTS.md and the
raw figures to benchmarks/work/memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import (  # noqa: E402
    BENCH_DIR,
    WORK,
    ensure_arithmetic_data,
    ensure_model,
    run_contender,
    thread_env,
    write_section,
)

ROLE_ORDER = ("driver", "policy", "rollout", "reference", "reward", "ray daemons", "ray task and idle workers",
              "other")


def measure(opts: argparse.Namespace) -> list[dict[str, Any]]:
    model = str(ensure_model(WORK / "model"))
    data = ensure_arithmetic_data(WORK / "data" / "grpo.jsonl", 2000, 200)
    runs = []
    for n in opts.completions:
        for contender in ("swiftray", "trl"):
            tag = f"memory_{contender}_{n}"
            print(f"[memory] {tag} ...", flush=True)
            run = run_contender([str(BENCH_DIR / "grpo_bench.py"), "--contender", contender, "--model", model,
                                 "--data", str(data), "--out", str(WORK / "runs" / tag), "--steps", str(opts.steps),
                                 "--batch", str(n), "--num_generations", str(n), "--threads", str(opts.threads)],
                                env=thread_env(opts.threads, "PASSIVE"), timeout=1800,
                                log_path=WORK / "logs" / f"{tag}.log")
            runs.append({"contender": contender, "completions": n, "peak_rss_tree_mb": run["peak_rss_tree_mb"],
                         "peak_rss_role_mb": run["peak_rss_role_mb"], "s_per_step": run["s_per_step"],
                         "rss_role_at_tree_peak_mb": run["rss_role_at_tree_peak_mb"],
                         "load_average_1min": run["load_average_1min"]})
            (WORK / "memory.json").write_text(json.dumps(runs, indent=1))
    return runs


def driver_growth(runs: list[dict[str, Any]]) -> tuple[float, float, float] | None:
    """(smallest, largest driver peak MB, growth) over swiftray's runs; None without a driver figure."""
    drivers = [r["peak_rss_role_mb"].get("driver", 0) for r in runs if r["contender"] == "swiftray"]
    if not drivers or not min(drivers):
        return None
    return min(drivers), max(drivers), max(drivers) / min(drivers) - 1


def section(runs: list[dict[str, Any]], steps: int) -> str:
    swift = [r for r in runs if r["contender"] == "swiftray"]
    trl = {r["completions"]: r for r in runs if r["contender"] == "trl"}
    seen = {role for r in swift for role in r["peak_rss_role_mb"]}
    roles = [role for role in ROLE_ORDER if role in seen] + sorted(seen - set(ROLE_ORDER))
    lines = ["## 8. Memory per role as the completions per step grow", "",
             "Written by `python benchmarks/memory_bench.py` (raw: `benchmarks/work/memory.json`). GRPO on the "
             f"benchmark model, one prompt x N completions per step, 64 new tokens, {steps} steps; peak RSS in MB "
             "per role (each role's processes summed, each sampled 4x a second; shared pages count once per "
             "process) and of the whole process tree, beside TRL's single process.", "",
             "| completions per step | " + " | ".join(f"swiftray {r}" for r in roles)
             + " | swiftray all processes | TRL GRPOTrainer | swiftray / TRL | load |",
             "|---|" + "---|" * (len(roles) + 4)]
    for r in swift:
        t = trl.get(r["completions"])
        cells = [f"{r['peak_rss_role_mb'].get(role, 0):,.0f}" for role in roles]
        cells.append(f"{r['peak_rss_tree_mb']:,.0f}")
        cells += [f"{t['peak_rss_tree_mb']:,.0f}", f"{r['peak_rss_tree_mb'] / t['peak_rss_tree_mb']:.2f}"] if t else ["-", "-"]
        cells.append("/".join(f"{x:.1f}" for x in r["load_average_1min"]))
        lines.append(f"| {r['completions']} | " + " | ".join(cells) + " |")
    driver = driver_growth(runs)
    if driver:
        low, high, growth = driver
        lines += ["", f"Driver peak from {swift[0]['completions']} to {swift[-1]['completions']} completions: "
                  f"{low:,.0f} to {high:,.0f} MB, {100 * growth:+.1f}% "
                  f"(target within 10%: {'met' if growth <= 0.10 else 'missed'})."]
    for r in (swift[0], swift[-1]) if swift else ():
        if r["completions"] not in trl:
            continue
        ratio = r["peak_rss_tree_mb"] / trl[r["completions"]]["peak_rss_tree_mb"]
        at_peak = r.get("rss_role_at_tree_peak_mb", {})
        shares = ", ".join(f"{role} {at_peak[role]:,.0f}" for role in roles if at_peak.get(role))
        lines += [f"All swiftray processes at {r['completions']} completions: {ratio:.2f}x TRL's single process "
                  f"(target <= 2x: {'met' if ratio <= 2 else 'missed'})"
                  + (f"; at that peak, in MB: {shares}." if shares else ".")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--completions", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write_only", action="store_true", help="rewrite the section from benchmarks/work/memory.json")
    opts = p.parse_args()
    runs = json.loads((WORK / "memory.json").read_text()) if opts.write_only else measure(opts)
    write_section("memory_bench", section(runs, opts.steps))
    print(section(runs, opts.steps))


if __name__ == "__main__":
    main()
