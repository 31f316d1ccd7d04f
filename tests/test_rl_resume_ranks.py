"""Policy ranks may change between a save and a resume (issue 10): an RL run saved by one policy rank and
resumed by two, with the same global batch (8 completions per optimizer step: 8 x 1 rank, then 4 x 2
ranks), reaches the uninterrupted run's losses, rewards and gradient norms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _ray import ray_cluster  # noqa: F401

from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args
from swiftray.controller import rl

pytestmark = pytest.mark.slow

PLUGIN = '''
from swiftray.rewards import register_reward


@register_reward("varied_by_length")
def varied_by_length(completions, **kwargs):
    """Differs within every group: the position in the group of 4, plus a little length."""
    return [float(i % 4) + 0.01 * len(c) for i, c in enumerate(completions)]
'''


def run(out: Path, model: Path, plugin: Path, per_device: int, *flags: str) -> tuple[Path, list[dict]]:
    argv = ["--rlhf_type", "grpo", "--model", str(model), "--dataset", "swiftray/arithmetic#64", "--train_type",
            "full", "--max_steps", "4", "--per_device_train_batch_size", str(per_device),
            "--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "8",
            "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none", "--save_strategy", "steps",
            "--save_steps", "2", "--eval_strategy", "no", "--beta", "0.04", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--reward_funcs", "varied_by_length", "--external_plugins",
            str(plugin), *flags]
    run_dir = rl.run_rlhf(parse_args(RlhfArguments, argv))
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    return run_dir, [line for line in lines if "train/loss" in line]


def test_resume_on_two_ranks_of_a_one_rank_checkpoint_gives_the_same_losses(ray_cluster, tiny_model_dir,  # noqa: F811
                                                                            tmp_path, monkeypatch):
    plugin = tmp_path / "varied_reward.py"
    plugin.write_text(PLUGIN)
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    whole_dir, whole = run(tmp_path / "whole", tiny_model_dir, plugin, 8)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    _, resumed = run(tmp_path / "resumed", tiny_model_dir, plugin, 4, "--resume_from_checkpoint",
                     str(whole_dir / "checkpoint-2"))
    assert [line["step"] for line in resumed] == [3, 4]
    assert whole[2]["train/grad_norm"] > 0  # the steps compared do move the weights
    for a, b in zip(whole[2:], resumed):
        for key in ("train/loss", "train/reward", "train/kl", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key, a[key], b[key])
