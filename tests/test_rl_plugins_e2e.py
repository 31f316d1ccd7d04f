"""User code in real runs: the example plug-in file (class, function and async rewards, an algorithm),
a reward that raises (the CLI's one-line error), and the Python-API example script.

Rewards are recomputed here from completions.jsonl, and the logged advantages from the logged
rewards, so a plug-in that was not called, or called without its dataset column, fails.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from _ray import REPO, ray_cluster  # noqa: F401

from swiftray.algorithms.grpo_math import group_advantages
from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args
from swiftray.controller import rl
from swiftray.data.builtin import arithmetic_split

torch.set_num_threads(1)
EXAMPLE_PLUGIN = REPO / "scripts" / "plugins" / "example_plugin.py"
API_SCRIPT = REPO / "scripts" / "grpo_python_api.py"


def common_flags(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--dataset", "swiftray/arithmetic#64", "--train_type", "full",
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--num_generations", "4", "--max_completion_length", "16", "--logging_steps", "1",
            "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no", "--beta", "0"]


def read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train lines of logging.jsonl, completions.jsonl rows)."""
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    return [line for line in lines if "train/loss" in line], rows


@pytest.fixture(scope="module")
def solutions() -> dict[str, str]:
    """Question text -> the `solution` column, for recomputing rewards from logged prompts."""
    return {row["messages"][0]["content"]: row["solution"] for row in arithmetic_split("train")}


def abs_mean_by_step(rows: list[dict], advantages) -> list[float]:
    out = []
    for step in sorted({r["step"] for r in rows}):
        rewards = torch.tensor([r["reward"] for r in rows if r["step"] == step], dtype=torch.float64)
        out.append(float(advantages(rewards).abs().mean()))
    return out


def test_example_plugin_rewards_and_algorithm_run_end_to_end(ray_cluster, tiny_model_dir, tmp_path,  # noqa: F811
                                                            solutions):
    argv = common_flags(tiny_model_dir, tmp_path) + [
        "--external_plugins", str(EXAMPLE_PLUGIN), "--rlhf_type", "grpo_rloo", "--log_completions", "true",
        "--reward_funcs", "solution_digits", "answer_length", "last_number_judge"]
    train, rows = read_run(rl.run_rlhf(parse_args(RlhfArguments, argv)))
    assert len(train) == 2 and len(rows) == 16

    # Each style's values, recomputed from the completion and its prompt's `solution` column.
    for row in rows:
        text, answer = row["completion"], solutions[row["prompt"]]
        numbers = re.findall(r"-?\d+", text)
        assert row["solution_digits"] == pytest.approx(sum(d in text for d in answer) / len(answer))
        assert row["answer_length"] == pytest.approx(-max(0, len(text) - 10 * len(answer)) / 100)
        assert row["last_number_judge"] == (1.0 if numbers and numbers[-1] == answer else 0.0)
        total = row["solution_digits"] + row["answer_length"] + row["last_number_judge"]
        assert row["reward"] == pytest.approx(total, abs=1e-6)
    for name in ("solution_digits", "answer_length", "last_number_judge"):
        assert f"train/rewards/{name}/mean" in train[0]

    # The plug-in algorithm made the advantages: RLOO's, not GRPO's std-scaled ones.
    def rloo(r):
        g = r.view(-1, 4)
        return g - (g.sum(1, keepdim=True) - g) / 3

    logged = [line["train/advantage/abs_mean"] for line in train]
    assert logged == pytest.approx(abs_mean_by_step(rows, rloo), abs=1e-5)
    grpo = abs_mean_by_step(rows, lambda r: group_advantages(r, 4, "group"))
    assert max(abs(a - b) for a, b in zip(logged, grpo)) > 1e-3  # the check can tell the two apart


BOOM = '''
from swiftray.rewards import register_reward


@register_reward("boom")
def boom(completions, solution, **kwargs):
    for s in solution:
        if int(s) % 2:
            raise ValueError(f"cannot grade odd answer {s}")
    return [0.0] * len(completions)
'''


def test_a_raising_reward_stops_the_run_with_one_readable_line(ray_cluster, tiny_model_dir, tmp_path,  # noqa: F811
                                                               capsys, monkeypatch):
    from swiftray import cli

    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM)
    monkeypatch.delenv("SWIFTRAY_DEBUG", raising=False)
    argv = ["rlhf", "--rlhf_type", "grpo", *common_flags(tiny_model_dir, tmp_path / "out"),
            "--external_plugins", str(plugin), "--reward_funcs", "boom"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("swiftray rlhf: error:")]
    assert len(err) == 1, err
    match = re.fullmatch(r"swiftray rlhf: error: reward function 'boom' raised on sample (\d+) "
                         r"\(completion .*\): ValueError: cannot grade odd answer (\d+) "
                         r"\(full traceback: (.*error\.log)\)", err[0])
    assert match, err[0]  # the function, the sample, the cause; no Ray wrapping or remote traceback
    assert int(match.group(2)) % 2 == 1
    assert "Traceback" in Path(match.group(3)).read_text()  # the details are kept, off the console


def test_python_api_script_subclasses_grpo_and_registers_a_reward_in_code(ray_cluster, tiny_model_dir,  # noqa: F811
                                                                        tmp_path, monkeypatch, solutions):
    monkeypatch.setattr(sys, "argv", [str(API_SCRIPT), "--model", str(tiny_model_dir), "--output_dir",
                                      str(tmp_path), "--max_steps", "2", "--max_completion_length", "16",
                                      "--save_strategy", "no", "--dataset", "swiftray/arithmetic#64"])
    runpy.run_path(str(API_SCRIPT), run_name="__main__")  # as `python scripts/grpo_python_api.py ...`
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    train, rows = read_run(run_dir)
    assert len(train) == 2 and len(rows) == 16
    for row in rows:  # the in-code reward ran in the reward actor, with the `solution` column
        numbers = re.findall(r"-?\d+", row["completion"])
        answer = int(solutions[row["prompt"]])
        hit = 1.0 / (1.0 + abs(int(numbers[-1]) - answer)) if numbers else 0.0
        assert row["closeness"] == pytest.approx(hit - 0.001 * len(row["completion"]))

    def rank(r):  # the script's advantage, restated: evenly spaced in [-1, 1] by rank within the group
        out = []
        for group in r.view(-1, 4).tolist():
            for x in group:
                below, equal = sum(y < x for y in group), sum(y == x for y in group)
                out.append(2 * (below + (equal - 1) / 2) / 3 - 1)
        return torch.tensor(out)

    assert [line["train/advantage/abs_mean"] for line in train] == pytest.approx(abs_mean_by_step(rows, rank),
                                                                               abs=1e-5)
