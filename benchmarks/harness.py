"""Shared pieces of the benchmarks: the model and data every contender uses, subprocess runs with
peak-memory sampling, medians, and the machine's facts.

Each contender runs in its own fresh Python process (`run_contender`), so that one's threads, caches
and Ray cluster never leak into the next; the orchestrator samples the resident memory of that
process and all its descendants (Ray's raylet, GCS and actors included) while it runs.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / "work"
PYTHON = sys.executable

# The benchmark model: Qwen3-shaped, about 26M parameters (hidden 512, 8 layers).
MODEL_SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                   intermediate_size=1536)
DATA_SEED = 1234


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def thread_env(threads: int, wait_policy: str) -> dict[str, str]:
    """The environment every contender process starts with: same threads, same OpenMP waiting."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY=wait_policy,
               TOKENIZERS_PARALLELISM="false", SWIFTRAY_NO_PROGRESS="1", PYTHONPATH=str(REPO),
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_DISABLED="true", RAY_DEDUP_LOGS="0", TQDM_DISABLE="1")
    env.pop("RAY_ADDRESS", None)  # every swiftray contender starts its own local cluster
    return env


# Ray's own daemons: its fixed cost, whatever the run does.
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server")


IDLE_ROLE = "ray task and idle workers"


def process_role(proc: Any, root_pid: int) -> str:
    """What a process of a contender's tree is: the driver, a swiftray role's actor (Ray titles them
    `ray::PolicyActor...`), one of Ray's daemons, or an idle Ray worker."""
    import psutil

    if proc.pid == root_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if cmd.startswith("ray::"):
        name = cmd[5:].split(".")[0].split()[0]
        if name.endswith("Agent"):  # DashboardAgent, RuntimeEnvAgent: Ray's per-node agents
            return "ray daemons"
        if name.endswith("Actor"):
            return name.removesuffix("Actor").lower()
        return IDLE_ROLE  # `ray::IDLE`, or a worker running a task (`ray::make_step_batch`)
    if "default_worker.py" in cmd:  # a Ray worker before it takes its `ray::` title
        return IDLE_ROLE
    return "ray daemons" if any(d in cmd for d in RAY_DAEMONS) else "other"


def _tree_rss(proc: Any) -> dict[int, tuple[int, str]]:
    """{pid: (RSS in bytes, role by its title now)} over the process tree."""
    import psutil

    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = (p.memory_info().rss, process_role(p, proc.pid))
        except psutil.Error:
            continue
    return out


def memory_peaks(samples: list[dict[int, tuple[int, str]]]) -> dict[str, Any]:
    """Peaks over a run's samples: of the whole tree, of its largest process, of each role's processes summed.

    A Ray worker is titled `ray::IDLE` until its actor's class is loaded, and an actor's worker imports
    torch before that, and an exiting one loses its title: all of a process's samples count for the most
    specific role it was seen with (an actor's, then Ray's daemons, then idle, then "other"), so that an
    actor's start-up and exit are booked to it."""
    rank = {"other": 0, IDLE_ROLE: 1, "ray daemons": 2}  # anything else (driver, an actor's role) ranks 3
    final: dict[int, str] = {}
    for sample in samples:
        for pid, (_, role) in sample.items():
            if pid not in final or rank.get(role, 3) > rank.get(final[pid], 3):
                final[pid] = role
    tree = largest = 0
    roles: dict[str, int] = {}
    at_tree_peak: dict[str, int] = {}
    for sample in samples:
        total, per_role = 0, {}
        for pid, (rss, _) in sample.items():
            total += rss
            largest = max(largest, rss)
            per_role[final[pid]] = per_role.get(final[pid], 0) + rss
        for role, rss in per_role.items():
            roles[role] = max(roles.get(role, 0), rss)
        if total > tree:
            tree, at_tree_peak = total, per_role
    mb = 2**20
    return {"peak_rss_tree_mb": tree / mb, "peak_rss_process_mb": largest / mb,
            "peak_rss_role_mb": {r: v / mb for r, v in roles.items()},
            "rss_role_at_tree_peak_mb": {r: v / mb for r, v in at_tree_peak.items()}}


def run_contender(args: list[str], *, env: dict[str, str], timeout: float, log_path: Path,
                  python: str = PYTHON) -> dict[str, Any]:
    """Run `python args...` which prints one JSON line starting with 'RESULT '; add peak memory to it."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    samples: list[dict[int, tuple[int, str]]] = []
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, *args], stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO, text=True)
        ps = psutil.Process(proc.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(_tree_rss(ps))
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(ps)
            out, _ = proc.communicate()
            raise RuntimeError(f"{' '.join(args)} ran past {timeout}s; see {log_path}") from None
        finally:
            done.set()
            sampler.join()
            _kill_tree(ps)  # Ray leftovers, if the contender died without shutting down
        log.write(out)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}); see {log_path}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]  # other users' work skews every figure
    result.update(memory_peaks(samples))
    return result


def _kill_tree(proc: Any) -> None:
    import psutil

    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    for p in children:
        try:
            p.kill()
        except psutil.Error:
            pass


def emit(result: dict[str, Any]) -> None:
    """A contender's last word: one JSON line the orchestrator picks out of stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def ensure_model(path: Path, **shape: Any) -> Path:
    """The benchmark model (built once; same seed gives the same weights)."""
    if not (path / "config.json").exists():
        from swiftray.models.tiny import make_tiny_model

        make_tiny_model(path, seed=0, **(shape or MODEL_SHAPE))
    return path


def ensure_arithmetic_data(path: Path, start: int, n: int) -> Path:
    """Rows start..start+n of the built-in arithmetic train split in one fixed shuffled order, as JSONL.

    Every contender reads such a file front to back without shuffling, so that they all see the same
    batches (SFT) or prompts (GRPO) in the same order.
    """
    if not path.exists():
        from swiftray.data.builtin import load_builtin

        rows = load_builtin("swiftray/arithmetic")
        random.Random(DATA_SEED).shuffle(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for row in rows[start:start + n]:
                f.write(json.dumps({"messages": row["messages"], "solution": row["solution"]}) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def machine_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache",
                               "L3 cache"):
                facts[key.strip()] = value.strip()
        flags = next((ln for ln in lscpu.splitlines() if ln.startswith("Flags")), "")
        facts["avx512"] = "avx512f" in flags
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        facts["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for name in ("transformers", "trl", "ray", "accelerate", "datasets", "ms-swift", "swiftray"):
        try:
            facts[name] = version(name)
        except PackageNotFoundError:
            facts[name] = None
    facts["load_average_at_start"] = os.getloadavg()
    return facts


def section_markers(name: str) -> tuple[str, str]:
    """The comments around a section of RESULTS.md that a benchmark other than main.py writes."""
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


SECTION_PATTERN = r"<!-- (\w+): begin -->.*?<!-- \1: end -->"


def write_section(name: str, text: str, path: Path = BENCH_DIR / "RESULTS.md") -> None:
    """Put `text` between `name`'s markers in RESULTS.md, replacing what was there, or before `## Targets`.

    main.py rewrites the rest of the file and keeps these sections as they are (report.py)."""
    begin, end = section_markers(name)
    section = f"{begin}\n{text}\n{end}"
    doc = path.read_text() if path.exists() else ""
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + section + doc[doc.index(end) + len(end):]
    elif "## Targets" in doc:
        doc = doc.replace("## Targets", section + "\n\n## Targets", 1)
    else:
        doc += "\n" + section + "\n"
    path.write_text(doc)


def step_end_recorder(ends: list[float], since: float = 0.0) -> Any:
    """A transformers TrainerCallback appending `perf_counter() - since` to `ends` at every step's end."""
    from transformers import TrainerCallback

    class StepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter() - since)

    return StepEnd()


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
