"""PPO, GKD and GRPO's advantage estimators in real runs (issue 13): small runs on the tiny model in the
session's Ray cluster, each through the algorithm interface alone.

- PPO: resuming from a checkpoint reaches the uninterrupted run's policy and critic losses; the critic
  is checkpointed beside the policy; a reward model scores beside the rule rewards and starts the critic.
- GRPO with --advantage_estimator rloo / reinforce_plus_plus: the logged advantages equal a float64
  re-statement of the estimator applied to the logged rewards; with kl_in_reward the KL leaves the loss.
- GKD: steps alternate between the student's samples and the dataset's responses as --lmbda draws
  them, and the loss is the divergence to the teacher (plus --sft_alpha x NLL on dataset steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _ray import ray_cluster  # noqa: F401

from swiftray.algorithms.gkd_math import gkd_data_source
from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args
from swiftray.controller import rl

torch.set_num_threads(1)


def run(out: Path, model: Path, *flags: str) -> Path:
    argv = ["--model", str(model), "--dataset", "swiftray/arithmetic#64", "--train_type", "full",
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--max_completion_length", "12", "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none",
            "--save_strategy", "no", "--learning_rate", "1e-3", *flags]
    return rl.run_rlhf(parse_args(RlhfArguments, argv))


def read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    path = run_dir / "completions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if "train/loss" in line], rows


@pytest.mark.slow
def test_ppo_resume_reaches_the_same_policy_and_critic_losses(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    flags = ["--rlhf_type", "ppo", "--reward_funcs", "accuracy", "format", "--max_steps", "4", "--num_ppo_epochs",
             "2", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "4"]
    whole_dir = run(tmp_path / "whole", tiny_model_dir, *flags)
    whole, _ = read_run(whole_dir)
    critic = whole_dir / "checkpoint-2" / "critic"
    assert (critic / "model.safetensors").is_file() and (critic / "train_state" / "optimizer.safetensors").is_file()
    assert json.loads((critic / "config.json").read_text())["architectures"] == ["Qwen3ForTokenClassification"]
    resumed, _ = read_run(run(tmp_path / "resumed", tiny_model_dir, *flags, "--resume_from_checkpoint",
                              str(whole_dir / "checkpoint-2")))
    assert [line["step"] for line in resumed] == [3, 4]
    keys = ("train/loss", "train/critic/loss", "train/reward", "train/objective/kl", "train/grad_norm",
            "train/critic/grad_norm", "train/val/explained_variance", "train/critic/val/clipfrac_avg", "train/lr")
    for a, b in zip(whole[2:], resumed):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a[key], b[key])
    # The value loss, value clip fraction and explained variance are logged beside the policy's metrics.
    assert all(k in whole[0] for k in ("train/critic/loss/value_avg", "train/policy/clipfrac_avg",
                                       "train/objective/rlhf_reward", "train/iter2/loss"))


def test_ppo_with_a_reward_model_beside_rule_rewards(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    from swiftray.models.reward_model import load_reward_model, save_reward_model

    reward_model = load_reward_model(str(tiny_model_dir), seed=5)
    with torch.no_grad():
        reward_model.score.weight.normal_(std=0.5)
    # The reward model scores the policy's token ids: it ships the policy's tokenizer (which the plan checks).
    save_reward_model(reward_model, str(tmp_path / "rm"), tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    run_dir = run(tmp_path / "out", tiny_model_dir, "--rlhf_type", "ppo", "--reward_funcs", "format",
                  "--reward_model", str(tmp_path / "rm"), "--reward_weights", "1", "0.5", "--num_ppo_epochs", "1",
                  "--max_steps", "1", "--log_completions", "true", "--per_device_train_batch_size", "4")
    train, rows = read_run(run_dir)
    assert len(rows) == 4 and len({r["rm"] for r in rows}) == 4  # the model scored each completion
    for row in rows:
        assert row["reward"] == pytest.approx(row["format"] + 0.5 * row["rm"], abs=1e-5)
    assert "train/rewards/rm/mean" in train[0]  # named by its folder


def rloo64(rewards: list[float], k: int) -> list[float]:
    out = []
    for g in range(0, len(rewards), k):
        group = rewards[g:g + k]
        out += [r - (sum(group) - r) / (k - 1) for r in group]
    return out


def reinforce_pp64(rewards: list[float], k: int) -> list[float]:
    centred = []
    for g in range(0, len(rewards), k):
        group = rewards[g:g + k]
        centred += [r - sum(group) / k for r in group]
    mean = sum(centred) / len(centred)
    std = (sum((c - mean) ** 2 for c in centred) / (len(centred) - 1)) ** 0.5
    return [c / (std + 1e-4) for c in centred]


@pytest.mark.parametrize("estimator,formula", [("rloo", rloo64), ("reinforce_plus_plus", reinforce_pp64)])
def test_estimator_advantages_in_a_run_equal_the_formula_on_the_logged_rewards(ray_cluster, tiny_model_dir,  # noqa: F811
                                                                               tmp_path, estimator, formula):
    train, rows = read_run(run(tmp_path, tiny_model_dir, "--rlhf_type", "grpo", "--advantage_estimator", estimator,
                               "--beta", "0", "--num_generations", "4", "--log_completions", "true",
                               "--reward_funcs", "solution_digits", "answer_length", "--external_plugins",
                               str(Path(__file__).parent.parent / "scripts" / "plugins" / "example_plugin.py")))
    assert len(train) == 2 and len(rows) == 16
    for line in train:
        rewards = [r["reward"] for r in rows if r["step"] == line["step"]]
        assert len(set(rewards)) > 1  # the check can fail: the advantages are not all zero
        expected = sum(abs(a) for a in formula(rewards, 4)) / len(rewards)
        assert line["train/advantage/abs_mean"] == pytest.approx(expected, abs=1e-5)


def test_kl_in_reward_moves_the_kl_from_the_loss_into_the_reward(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    train, _ = read_run(run(tmp_path, tiny_model_dir, "--rlhf_type", "grpo", "--advantage_estimator", "rloo",
                            "--beta", "0.5", "--num_generations", "4", "--reward_funcs", "format"))
    assert all("train/kl" not in line for line in train)  # the loss has no KL term
    # Step 1 samples from the reference's own weights: zero KL; then the policy has moved.
    assert train[0]["train/kl_in_reward/sequence_kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert abs(train[1]["train/kl_in_reward/sequence_kl_mean"]) > 1e-4
    # The rewards are all 0 (no format), so the advantages come from the KL alone.
    assert train[1]["train/reward"] == 0.0 and train[1]["train/advantage/abs_mean"] > 0


def test_gkd_steps_follow_lmbda_and_train_on_the_divergence(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    from swiftray.models.tiny import make_tiny_model

    teacher = make_tiny_model(tmp_path / "teacher", seed=1)
    train, _ = read_run(run(tmp_path / "out", tiny_model_dir, "--rlhf_type", "gkd", "--teacher_model",
                            str(teacher), "--seed", "41", "--gkd_logits_topk", "16", "--sft_alpha", "0.5",
                            "--max_completion_length", "24"))
    sources = [gkd_data_source(step, lmbda=0.5, seed=41) for step in (1, 2)]
    assert sources == ["dataset", "student"]
    assert [line["train/gkd/on_policy"] for line in train] == [0.0, 1.0]
    for line, source in zip(train, sources):
        assert line["train/jsd"] > 0.01  # two different models
        sft = 0.5 * line["train/sft_nll"] if source == "dataset" else 0.0
        assert line["train/loss"] == pytest.approx(line["train/jsd"] + sft, rel=1e-4)
    assert train[0]["train/sft_nll"] > 0 and train[1]["train/sft_nll"] == 0.0
    assert "train/reward" not in train[0]
