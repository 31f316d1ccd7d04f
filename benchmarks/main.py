"""Run every benchmark, contenders alternating, and write benchmarks/RESULTS.md (see run.sh).

    python benchmarks/main.py [--sft_steps 8 --sft_repeats 3 --grpo_steps 10 ...] [--only sft grpo ...]

Raw results go to benchmarks/work/results.json as they arrive; `--report_only` rewrites
RESULTS.md from that file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import report  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    BENCH_DIR,
    REPO,
    WORK,
    ensure_arithmetic_data,
    ensure_model,
    machine_facts,
    run_contender,
    thread_env,
)

SECTIONS = ("sft", "grpo", "floor", "generation", "sync")
# ms-swift's own environment (run.sh builds it): it pins trl==0.29.1 and datasets<4.8.5.
MSSWIFT_PYTHON = BENCH_DIR / ".env-msswift" / "bin" / "python"
# Weight-sync sizes: (name, make_tiny_model shape); about 26M, 100M and 470M parameters.
SYNC_MODELS = {
    "26M": None,  # the benchmark model itself
    "100M": dict(hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=6, head_dim=64, intermediate_size=2304),
    "470M": dict(hidden_size=1280, num_layers=24, num_heads=10, num_kv_heads=5, head_dim=128,
                 intermediate_size=3840),
}


def rotated(items: list[Any], k: int) -> list[Any]:
    """Contenders alternate, and each repeat starts with a different one, so drift in the machine's
    load spreads over all of them."""
    k %= len(items)
    return items[k:] + items[:k]


class Bench:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.env = thread_env(opts.threads, opts.omp_wait_policy)
        self.results_path = WORK / "results.json"
        self.results: dict[str, Any] = json.loads(self.results_path.read_text()) if (
            self.results_path.exists() and opts.keep_results) else {}
        self.model = str(ensure_model(WORK / "model"))
        self.sft_data = ensure_arithmetic_data(WORK / "data" / "sft.jsonl", 0, 2000)
        self.grpo_data = ensure_arithmetic_data(WORK / "data" / "grpo.jsonl", 2000, 200)
        self.warm_data = ensure_arithmetic_data(WORK / "data" / "warm.jsonl", 2200, 2800)

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=1))

    def msswift(self) -> bool:
        """ms-swift runs when asked for and its environment exists (a missing one is recorded, not fatal)."""
        if self.opts.msswift and not MSSWIFT_PYTHON.exists():
            self.results["msswift_error"] = f"no {MSSWIFT_PYTHON} (benchmarks/run.sh builds it)"
        return bool(self.opts.msswift) and MSSWIFT_PYTHON.exists()

    def run(self, name: str, script: str, args: list[str], timeout: float = 900) -> dict[str, Any]:
        log = WORK / "logs" / f"{name}.log"
        print(f"[bench] {name} ...", flush=True)
        start = time.time()
        python = str(MSSWIFT_PYTHON) if script == "msswift_bench.py" else sys.executable
        result = run_contender([str(BENCH_DIR / script), *args], env=self.env, timeout=timeout, log_path=log,
                               python=python)
        result["wall_s"] = time.time() - start
        print(f"[bench] {name}: {result['wall_s']:.0f}s", flush=True)
        return result

    # --- 1. SFT ---------------------------------------------------------------------------------
    def sft(self) -> None:
        o = self.opts
        # fp32 (the setting), then each contender's bf16: TRL / Trainer both ways (bf16 weights,
        # and fp32 weights under autocast, what bf16=True does with an fp32 model), swiftray with bf16 weights.
        configs = [("swiftray", 1, "fp32"), ("trl", 1, "fp32"), ("swiftray", 0, "fp32"), ("trl", 0, "fp32"),
                   ("hf", 0, "fp32"), ("swiftray", 1, "bf16"), ("trl", 0, "bf16_autocast"), ("swiftray", 0, "bf16"),
                   ("trl", 0, "bf16")]
        if self.msswift():  # ms-swift's packing needs flash-attn (padding-free): unpacked only
            configs += [("msswift", 0, "fp32"), ("msswift", 0, "bf16")]
        from swiftray.plan import cpu_has_fast_matmul

        if not cpu_has_fast_matmul("bfloat16"):  # bf16 would run a reference loop: every row 50x slower
            configs = [c for c in configs if c[2] == "fp32"]
            self.results["bf16_skipped"] = ("this CPU has no bf16 matmul units (no AVX-512 BF16 or AMX): torch "
                                            "multiplies bf16 in a reference loop, so the bf16 rows were not run")
        runs = []
        for rep in range(o.sft_repeats):
            for contender, packing, precision in rotated(configs, rep):
                tag = f"sft_{contender}_p{packing}_{precision}_r{rep}"
                script, head = (("msswift_bench.py", ["sft"]) if contender == "msswift"
                                else ("sft_bench.py", ["--contender", contender, "--workers", str(o.sft_workers)]))
                runs.append(self.run(tag, script, [
                    *head, "--packing", str(packing), "--precision", precision,
                    "--model", self.model,
                    "--data", str(self.sft_data), "--out", str(WORK / "runs" / tag), "--steps", str(o.sft_steps),
                    "--threads", str(o.threads)]))
        self.results["sft"] = runs
        self.save()

    # --- 2. GRPO (and the sequential floor, run alongside) --------------------------------------------
    def warm_checkpoint(self) -> str:
        """A short swiftray SFT so that the GRPO start answers in the format sometimes: rewards vary."""
        out = WORK / "warm_sft"
        found = sorted(out.glob("checkpoint-*"))
        if found and (found[-1] / "config.json").exists():
            return str(found[-1])
        shutil.rmtree(out, ignore_errors=True)
        steps = self.opts.warm_steps
        args = [sys.executable, "-m", "swiftray.cli", "sft", "--model", self.model, "--train_type", "full",
                "--dataset", str(self.warm_data), "--max_length", "256", "--packing", "true",
                "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                "--max_steps", str(steps), "--learning_rate", "1e-3", "--warmup_ratio", "0.1",
                "--gradient_checkpointing", "false", "--save_steps", str(steps), "--save_only_model", "true",
                "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "10", "--add_version", "false",
                "--output_dir", str(out)]
        print("[bench] warm-up SFT for the GRPO start ...", flush=True)
        start = time.time()
        log = WORK / "logs" / "warm_sft.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            subprocess.run(args, env=self.env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=1200)
        self.results["warm_sft_s"] = time.time() - start
        found = sorted(out.glob("checkpoint-*"))
        if not found:
            raise RuntimeError(f"warm-up SFT wrote no checkpoint; see {WORK / 'logs' / 'warm_sft.log'}")
        return str(found[-1])

    def grpo(self) -> None:
        o = self.opts
        start = self.warm_checkpoint()
        self.results["grpo_start"] = start
        runs = []
        contenders = ["swiftray_async", "trl", "swiftray", "floor"] + (["msswift"] if self.msswift() else [])
        for rep in range(o.grpo_repeats):
            for contender in rotated(contenders, rep):
                tag = f"grpo_{contender}_r{rep}"
                script, head = (("msswift_bench.py", ["grpo"]) if contender == "msswift"
                                else ("grpo_bench.py", ["--contender", contender]))
                runs.append(self.run(tag, script, [
                    *head, "--model", start, "--data", str(self.grpo_data),
                    "--out", str(WORK / "runs" / tag), "--steps", str(o.grpo_steps), "--lr", str(o.grpo_lr),
                    "--threads", str(o.threads)]))
        if o.grpo_before:  # once: swiftray without this benchmark's fixes, for the before/after row
            tag = "grpo_swiftray_before"
            runs.append(self.run(tag, "grpo_bench.py", [
                "--contender", "swiftray", "--before", "1", "--model", start, "--data", str(self.grpo_data),
                "--out", str(WORK / "runs" / tag), "--steps", str(o.grpo_steps), "--lr", str(o.grpo_lr)]))
        self.results["grpo"] = runs
        self.save()

    # --- 3. arithmetic floor --------------------------------------------------------------------------
    def floor(self) -> None:
        self.results["matmul"] = self.run("matmul_rate", "flops.py", ["--threads", str(self.opts.threads)])
        self.results["model_config"] = json.loads((Path(self.model) / "config.json").read_text())
        self.save()

    # --- 4. generation ----------------------------------------------------------------------------------
    def generation(self) -> None:
        o = self.opts
        model = self.results.get("grpo_start") or self.model
        common = ["--model", model, "--data", str(self.grpo_data), "--repeats", str(o.gen_repeats),
                  "--threads", str(o.threads)]
        engines = ["--engines", "generate", "hf", "hf-int8"]
        self.results["generation"] = self.run("generation", "gen_bench.py", [*engines, *common])
        if o.threads > 1:  # decoding few rows can run faster on one thread: each engine is judged at its best
            one = [*common[:-1], "1"]
            self.results["generation_1thread"] = self.run("generation_1thread", "gen_bench.py",
                                                          [*engines, *one])
        vllm_python = REPO / ".venv-vllm" / "bin" / "python"
        if o.vllm and vllm_python.exists():
            from benchmarks.harness import run_contender as _run

            try:
                self.results["generation_vllm"] = _run(
                    [str(BENCH_DIR / "gen_bench.py"), "--engines", "vllm", *common],
                    env=self.env, timeout=900, log_path=WORK / "logs" / "generation_vllm.log", python=str(vllm_python))
            except RuntimeError as err:
                self.results["generation_vllm"] = {"error": str(err)}
        elif o.vllm:
            self.results["generation_vllm"] = {"error": "no .venv-vllm (scripts/setup_vllm_cpu.sh builds it)"}
        self.save()

    # --- 5. weight sync ---------------------------------------------------------------------------------
    def sync(self) -> None:
        dirs = []
        for name in self.opts.sync_sizes:
            shape = SYNC_MODELS[name]
            dirs.append(self.model if shape is None else str(ensure_model(WORK / f"sync-{name}", **shape)))
        self.results["sync"] = self.run("weight_sync", "sync_bench.py",
                                        ["--models", *dirs, "--repeats", str(self.opts.sync_repeats),
                                         "--threads", str(self.opts.threads)])
        self.save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--threads", type=int, default=2, help="cores per contender (TRL: torch threads)")
    p.add_argument("--omp_wait_policy", default="PASSIVE", help="OMP_WAIT_POLICY for every contender")
    p.add_argument("--sft_steps", type=int, default=6)
    p.add_argument("--sft_repeats", type=int, default=3)
    p.add_argument("--sft_workers", type=int, default=1, help="swiftray policy workers sharing the cores")
    p.add_argument("--warm_steps", type=int, default=40, help="SFT steps that make the GRPO start")
    p.add_argument("--grpo_steps", type=int, default=8)
    p.add_argument("--grpo_repeats", type=int, default=2)
    p.add_argument("--grpo_lr", type=float, default=1e-5)
    p.add_argument("--grpo_before", type=int, default=1, help="also run swiftray without this benchmark's fixes")
    p.add_argument("--gen_repeats", type=int, default=3)
    p.add_argument("--msswift", type=int, default=1, help="also run ms-swift (in benchmarks/.env-msswift)")
    p.add_argument("--vllm", type=int, default=1, help="also time the vllm engine when .venv-vllm exists")
    p.add_argument("--sync_sizes", nargs="+", default=list(SYNC_MODELS), choices=list(SYNC_MODELS))
    p.add_argument("--sync_repeats", type=int, default=3)
    p.add_argument("--keep_results", action="store_true", help="add to benchmarks/work/results.json")
    p.add_argument("--report_only", action="store_true")
    opts = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if not opts.report_only:
        start = time.time()
        bench = Bench(opts)
        bench.results["machine"] = machine_facts()
        if MSSWIFT_PYTHON.exists():  # ms-swift lives in its own environment
            bench.results["machine"]["ms-swift"] = subprocess.run(
                [str(MSSWIFT_PYTHON), "-c", "from importlib.metadata import version; print(version('ms-swift'))"],
                capture_output=True, text=True, check=True).stdout.strip()
        bench.results["options"] = vars(opts)
        sections = bench.results.setdefault("section_s", {})
        for section in SECTIONS:
            if section in opts.only:
                t = time.time()
                getattr(bench, section)()
                sections[section] = time.time() - t
        bench.results["total_s"] = time.time() - start if len(opts.only) == len(SECTIONS) else sum(
            sections.values())
        bench.save()
    results = json.loads((WORK / "results.json").read_text())
    report.write(results, BENCH_DIR / "RESULTS.md", BENCH_DIR / "results.png")
    print(f"[bench] wrote {BENCH_DIR / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
