"""The RL step from the plan: the colocated call order, a plug-in algorithm with a role of its own,
and resuming an RL run (issue 9). Small runs on the tiny model, in the session's Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _ray import REPO, ray_cluster  # noqa: F401

from swiftray.actors.group import ActorGroup
from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args
from swiftray.controller import rl

torch.set_num_threads(1)
STEP_CALLS = ("generate", "sleep", "wake_up", "onload", "offload", "train_step", "export_weights",
              "update_weights", "save_checkpoint")


def run(out: Path, model: Path, *flags: str) -> Path:
    argv = ["--rlhf_type", "grpo", "--model", str(model), "--dataset", "swiftray/arithmetic#64", "--train_type",
            "full", "--max_steps", "2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--num_generations", "4", "--max_completion_length", "12", "--logging_steps", "1", "--output_dir",
            str(out), "--report_to", "none", "--save_strategy", "no", "--reward_funcs", "accuracy", "format",
            "--learning_rate", "1e-3", *flags]
    return rl.run_rlhf(parse_args(RlhfArguments, argv))


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [line for line in lines if "train/loss" in line]


def test_colocated_step_sleeps_wakes_offloads_and_onloads_in_order(ray_cluster, tiny_model_dir, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    calls: list[tuple[str, str, tuple]] = []
    real_all, real_ranked, real_generate = ActorGroup.call_all, ActorGroup.call_all_ranked, rl.RLStep.generate

    def call_all(self, method, *args, **kwargs):
        if method in STEP_CALLS:
            calls.append((self.name, method, args or tuple(sorted(kwargs.items()))))
        return real_all(self, method, *args, **kwargs)

    def call_all_ranked(self, method, per_rank, *args, **kwargs):
        if method in STEP_CALLS:
            calls.append((self.name, method, ()))
        return real_ranked(self, method, per_rank, *args, **kwargs)

    def generate(self, *args, **kwargs):
        calls.append(("rollout", "generate", ()))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(ActorGroup, "call_all", call_all)
    monkeypatch.setattr(ActorGroup, "call_all_ranked", call_all_ranked)
    monkeypatch.setattr(rl.RLStep, "generate", generate)
    run(tmp_path, tiny_model_dir, "--sleep_level", "1", "--offload_model", "true", "--offload_optimizer", "true",
        "--gc_collect_after_offload", "true", "--beta", "0")
    offload = ("policy", "offload", (("gc_collect", True), ("model", True), ("optimizer", True)))
    sync = [("policy", "export_weights", (rl.SYNC_BUCKET_BYTES,)), ("rollout", "update_weights", ())]
    step = [("rollout", "generate", ()), ("rollout", "sleep", (1,)), ("policy", "onload", ()),
            ("policy", "train_step", ()), ("rollout", "wake_up", (["weights"],)), *sync, offload,
            ("rollout", "wake_up", (["kv_cache"],))]
    got = [(role, method, args if method in ("sleep", "wake_up", "offload", "export_weights") else ())
           for role, method, args in calls]
    assert got == [*sync, offload, *step, *step]
    # The same run without colocation flags makes none of the memory calls.
    calls.clear()
    run(tmp_path / "plain", tiny_model_dir, "--beta", "0")
    assert not {m for _, m, _ in calls} & {"sleep", "wake_up", "offload", "onload"}


def test_a_plugin_algorithm_adds_a_trained_role_without_controller_changes(ray_cluster, tiny_model_dir,  # noqa: F811
                                                                          tmp_path):
    run_dir = run(tmp_path, tiny_model_dir, "--rlhf_type", "grpo_value_baseline", "--external_plugins",
                  str(REPO / "scripts" / "plugins" / "value_baseline.py"), "--max_steps", "4", "--beta", "0",
                  "--reward_funcs", "completion_chars",
                  "--save_strategy", "steps", "--save_steps", "4")
    lines = train_lines(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    # The baseline role trained beside the policy: its regression error fell as it learned the rewards.
    losses = [line["train/baseline/loss"] for line in lines]
    assert losses[-1] < losses[0], losses
    assert all(line["train/baseline/abs_error"] >= 0 for line in lines)
    # Its weights were checkpointed with the policy's, in a folder of its own.
    assert (run_dir / "checkpoint-4" / "baseline" / "baseline.safetensors").is_file()
    assert (run_dir / "checkpoint-4" / "model.safetensors").is_file()


def test_rl_resume_reaches_the_same_losses_and_rewards(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    flags = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--beta", "0.04"]
    whole_dir = run(tmp_path / "whole", tiny_model_dir, *flags)
    whole = train_lines(whole_dir)
    resumed_dir = run(tmp_path / "resumed", tiny_model_dir, *flags, "--resume_from_checkpoint",
                      str(whole_dir / "checkpoint-2"))
    resumed = train_lines(resumed_dir)
    assert [line["step"] for line in resumed] == [3, 4]
    for a, b in zip(whole[2:], resumed):
        for key in ("train/loss", "train/reward", "train/kl", "train/grad_norm", "train/lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a[key], b[key])
    # The rollout engines were re-synced to the checkpoint's weights: the resumed step 3 sampled from
    # weight version 2, as the uninterrupted run did.
    assert resumed[0]["train/rollout/version"] == 2.0


def test_value_baseline_actor_saves_and_loads(tmp_path):
    import runpy

    module = runpy.run_path(str(REPO / "scripts" / "plugins" / "value_baseline.py"))
    actor = module["BaselineActor"]()
    actor.setup({"seed": 0})
    with torch.no_grad():
        actor.weights.uniform_()
    actor.save_checkpoint(str(tmp_path))
    other = module["BaselineActor"]()
    other.setup({"seed": 1})
    other.load_checkpoint(str(tmp_path))
    assert torch.equal(other.weights, actor.weights)
