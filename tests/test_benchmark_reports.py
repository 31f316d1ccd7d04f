"""The benchmark reports' own logic: sections other benchmarks write survive, roles are told apart by
their process titles, and the verdicts follow the figures (the benchmarks themselves are not run here)."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.harness import SECTION_PATTERN, memory_peaks, process_role, write_section
from benchmarks.memory_bench import section as memory_section
from benchmarks.time_to_accuracy import minutes_to_gain


def test_a_section_is_replaced_between_its_markers_and_new_ones_go_before_the_targets(tmp_path: Path) -> None:
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Benchmarks\n\n## 1. SFT\n\ntable\n\n## Targets\n\n| target |\n")
    write_section("cluster_bench", "## 6. Cluster\n\nfirst", doc)
    write_section("megatron_bench", "## 7. Megatron\n\nrows", doc)
    write_section("cluster_bench", "## 6. Cluster\n\nsecond", doc)
    text = doc.read_text()
    assert "first" not in text and text.count("## 6. Cluster") == 1
    assert text.index("second") < text.index("## 7. Megatron") < text.index("## Targets")
    kept = [m.group(1) for m in re.finditer(SECTION_PATTERN, text, flags=re.DOTALL)]
    assert kept == ["cluster_bench", "megatron_bench"]


class FakeProcess:
    def __init__(self, pid: int, cmdline: list[str]) -> None:
        self.pid, self._cmdline = pid, cmdline

    def cmdline(self) -> list[str]:
        return self._cmdline


def test_processes_are_told_apart_by_their_ray_titles() -> None:
    cases = {
        ("ray::PolicyActor.train_step",): "policy",
        ("ray::RolloutActor",): "rollout",
        ("ray::ReferenceActor.logprobs",): "reference",
        ("ray::RewardModelActor.score",): "rewardmodel",
        ("ray::IDLE",): "ray task and idle workers",
        ("ray::make_step_batch",): "ray task and idle workers",
        ("ray::DashboardAgent",): "ray daemons",
        ("/venv/bin/python", "/venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py",
         "--raylet-name=/tmp/ray/session/sockets/raylet"): "ray task and idle workers",
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"):
            "ray daemons",
        ("/venv/bin/python", "something_else.py"): "other",
    }
    for cmdline, role in cases.items():
        assert process_role(FakeProcess(7, list(cmdline)), root_pid=1) == role, cmdline
    assert process_role(FakeProcess(1, ["python", "grpo_bench.py"]), root_pid=1) == "driver"


def test_a_worker_that_becomes_an_actor_counts_for_that_actor_from_its_start() -> None:
    mb = 2**20
    idle = "ray task and idle workers"
    samples = [{1: (500 * mb, "driver"), 7: (100 * mb, "ray daemons"), 8: (80 * mb, idle)},  # 7: worker starting
               {1: (500 * mb, "driver"), 7: (300 * mb, idle), 8: (80 * mb, idle)},  # 7 imports torch, untitled
               {1: (510 * mb, "driver"), 7: (900 * mb, "policy"), 8: (80 * mb, idle)},
               {1: (505 * mb, "driver"), 7: (700 * mb, "other"), 8: (80 * mb, idle)}]  # exiting: no title
    peaks = memory_peaks(samples)
    assert peaks["peak_rss_role_mb"] == {"driver": 510, "policy": 900, idle: 80}
    assert peaks["peak_rss_tree_mb"] == 1490 and peaks["peak_rss_process_mb"] == 900
    assert peaks["rss_role_at_tree_peak_mb"] == {"driver": 510, "policy": 900, idle: 80}


def test_minutes_to_a_gain_is_the_first_checkpoint_at_or_past_it() -> None:
    curve = [{"minutes": 0.0, "accuracy": 0.40}, {"minutes": 1.5, "accuracy": 0.44},
             {"minutes": 3.0, "accuracy": 0.50}, {"minutes": 4.5, "accuracy": 0.47}]
    assert minutes_to_gain(curve, 0.40, 4) == 1.5
    assert minutes_to_gain(curve, 0.40, 5) == 3.0
    assert minutes_to_gain(curve, 0.40, 10) == 3.0
    assert minutes_to_gain(curve, 0.40, 15) is None


def run(contender: str, n: int, driver: float, total: float) -> dict:
    roles = {"driver": driver, "policy": 900.0, "ray daemons": 300.0} if contender == "swiftray" else {"driver": total}
    return {"contender": contender, "completions": n, "peak_rss_tree_mb": total, "peak_rss_role_mb": roles,
            "s_per_step": 1.0, "load_average_1min": [1.0, 1.1]}


def test_the_memory_verdicts_follow_the_figures() -> None:
    flat = [run("swiftray", 8, 500, 3000), run("trl", 8, 0, 1400), run("swiftray", 64, 540, 3100),
            run("trl", 64, 0, 1600)]
    text = memory_section(flat, steps=3)
    assert "500 to 540 MB, +8.0% (target within 10%: met)" in text
    assert "1.94x TRL's single process (target <= 2x: met)" in text
    grown = [run("swiftray", 8, 500, 3000), run("trl", 8, 0, 1400), run("swiftray", 64, 600, 3300),
             run("trl", 64, 0, 1600)]
    text = memory_section(grown, steps=3)
    assert "+20.0% (target within 10%: missed)" in text and "2.06x" in text and "target <= 2x: missed" in text


def test_every_sft_contender_main_runs_has_a_name_in_the_report() -> None:
    from benchmarks.report import sft_name

    assert sft_name(("msswift", False, "fp32")) == "ms-swift sft, fp32"
    assert sft_name(("swiftray", True, "bf16")) == "swiftray sft --packing, bf16 weights"
    assert sft_name(("trl", True, "fp32")) == "TRL SFTTrainer packing=True, fp32"


def test_the_targets_table_lists_memory_and_time_to_accuracy_with_their_verdicts(tmp_path: Path) -> None:
    import json

    from benchmarks.report import other_targets

    (tmp_path / "memory.json").write_text(json.dumps(
        [run("swiftray", 8, 500, 2900), run("trl", 8, 0, 1400), run("swiftray", 64, 600, 3300),
         run("trl", 64, 0, 1600)]))

    def seed(s_min: float | None, t_min: float | None, asynchronous: bool) -> dict:
        return {"swiftray_async_generate": asynchronous,
                "contenders": {"swiftray": {"minutes_to_gain": {"20": s_min}}, "trl": {"minutes_to_gain": {"20": t_min}}}}

    (tmp_path / "time_to_accuracy.json").write_text(json.dumps(
        {"runs": {"42": seed(3.0, 6.5, False), "7": seed(5.0, None, True)}}))
    rows = {row[0]: row[1:] for row in other_targets(tmp_path)}
    assert rows["driver memory flat (within 10%) from 8 to 64 completions"] == ["+20.0%", "missed"]
    assert rows["all swiftray processes <= 2x TRL's one process (8 completions)"] == [
        "2.07x (2,900 vs 1,400 MB)", "missed"]
    # 0.46x on one seed; on the other only swiftray reaches the gain: met on both
    assert rows["minutes to the demo's held-out gain (+20 points) <= 0.5x TRL's"] == [
        "seed 42 (sequential): 0.46x (3.0 vs 6.5 min); seed 7 (async): swiftray 5.0 min, TRL not reached", "met"]
    (tmp_path / "time_to_accuracy.json").write_text(json.dumps({"runs": {"42": seed(3.3, 6.5, False)}}))
    assert other_targets(tmp_path)[-1][-1] == "missed"  # 0.51x


def test_the_generation_verdict_counts_the_int8_engine_and_reports_each_sync_cost() -> None:
    from benchmarks.report import generation_section, targets_table

    def result(int8: float | None) -> dict:
        engines = {"generate": {"tokens_per_s": 200.0}, "hf": {"tokens_per_s": 300.0}}
        if int8 is not None:
            engines["hf-int8"] = {"tokens_per_s": int8}
        return {"generation": {"threads": 2, "batches": {"8": engines}, "pack_s": {"hf": 0.01, "hf-int8": 0.3}}}

    text, summary = generation_section(result(480.0))
    assert "swiftray HFEngine, int8 weights (--rollout_quantization int8)" in text
    assert "swiftray HFEngine, int8 weights (--rollout_quantization int8) 0.300 s" in text
    [row] = [line for line in targets_table({"generation": summary}).splitlines() if "2x model.generate" in line]
    assert "1.50x at 8 (fp32" in row and "int8 weights: 2.40x at 8" in row and row.endswith("| met |")
    _, summary = generation_section(result(None))
    assert targets_table({"generation": summary}).splitlines()[-1].endswith("| missed |")  # fp32 alone: 1.5x
    _, summary = generation_section(result(380.0))
    assert targets_table({"generation": summary}).splitlines()[-1].endswith("| missed |")  # int8 at 1.9x
