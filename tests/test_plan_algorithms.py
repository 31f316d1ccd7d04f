"""Where PPO's critic, a reward model and GKD's teacher go (issue 13): placed by the run plan like every
other role, on described GPU clusters (colocated with the policy when GPUs are short, the engines
apart when there are enough) and on CPU; the critic trains with the policy's settings."""

from __future__ import annotations

import pytest
from test_plan import GRPO_FLAGS, gpu_cluster, rlhf_plan

from swiftray.arguments import ArgumentError
from swiftray.placement import Cluster, Node


def without(flags: list[str], *names: str) -> list[str]:
    """`flags` less the named flags and their values."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


# The reference GRPO command as PPO: the same devices, memory flags and engines.
PPO_FLAGS = ["--rlhf_type", "ppo", *without(GRPO_FLAGS, "--rlhf_type", "--num_generations", "--overlong_filter")]


def test_ppo_critic_sits_beside_each_policy_rank_and_trains_with_its_settings(tiny_model_dir):
    plan = rlhf_plan(tiny_model_dir, gpu_cluster(), *PPO_FLAGS, "--reward_model", str(tiny_model_dir))
    policy, critic = plan.role("policy"), plan.role("critic")
    reference, rollout, reward_model = plan.role("reference"), plan.role("rollout"), plan.role("reward_model")
    # One critic rank per policy rank, in the same bundle (GPU): policy, engine, reference, reward model,
    # critic share each GPU, a fifth each.
    assert critic.placement.group == "policy" and critic.placement.bundles == tuple(range(8))
    assert critic.placement.devices == policy.placement.devices == reference.placement.devices
    assert reward_model.placement.bundles == tuple(range(8))
    assert {r.placement.num_gpus for r in (policy, critic, reference, rollout, reward_model)} == {0.2}
    assert critic.phases == ("annotate", "train") and reward_model.phases == ("score",)
    assert plan.step.mode == "colocated"
    # The critic's config is the policy's with the value model's folder (--reward_model, as ms-swift).
    assert critic.config.backend == policy.config.backend == "deepspeed"
    assert critic.config.torch_dtype == "bfloat16" and critic.config.total_steps == policy.config.total_steps
    assert critic.config.learning_rate == policy.config.learning_rate
    assert critic.config.model_dir == reward_model.config.model_dir
    # One completion per prompt (TRL's PPO), --num_ppo_epochs passes.
    assert plan.batch.num_generations == 1 and plan.step.sampling.n == 1
    assert plan.batch.completions_per_generation == 16 and plan.algorithm.num_iterations == 4
    assert plan.step.sampling.temperature == 1.0  # the command's; PPO's own default is 0.9
    unset = rlhf_plan(tiny_model_dir, gpu_cluster(), "--rlhf_type", "ppo", "--reward_funcs", "accuracy")
    assert unset.step.sampling.temperature == 0.9


def test_ppo_on_sixteen_gpus_puts_engines_apart_and_the_critic_with_the_policy(tiny_model_dir):
    plan = rlhf_plan(tiny_model_dir, gpu_cluster(nodes=2), *PPO_FLAGS, "--value_model", "/v")
    critic, rollout = plan.role("critic"), plan.role("rollout")
    assert rollout.placement.group == "rollout" and plan.step.mode == "separate"
    assert critic.placement.group == "policy" and critic.placement.num_gpus == 0.33  # policy, reference, critic
    assert critic.config.model_dir == "/v"


def test_gkd_teacher_is_placed_like_the_reference(tiny_model_dir):
    plan = rlhf_plan(tiny_model_dir, gpu_cluster(), "--rlhf_type", "gkd", "--teacher_model", "/t", "--use_vllm",
                     "true", "--num_infer_workers", "8", "--per_device_train_batch_size", "2",
                     "--gradient_accumulation_steps", "1", "--gkd_logits_topk", "64", "--torch_dtype", "bfloat16")
    teacher, policy = plan.role("teacher"), plan.role("policy")
    assert teacher.placement.group == "policy" and teacher.placement.bundles == tuple(range(8))
    assert teacher.placement.num_gpus == 0.33 and teacher.phases == ("annotate",)
    assert teacher.config.topk == 64 and teacher.config.torch_dtype == "bfloat16" and teacher.config.model_dir == "/t"
    assert [r.name for r in plan.roles] == ["policy", "rollout", "teacher"]  # no reward, no reference
    assert plan.step.sampling.temperature == 0.9 and plan.batch.num_generations == 1
    assert policy.placement.num_gpus == 0.33


def test_cpu_plans_fit_the_new_roles_and_missing_models_are_refused(tiny_model_dir):
    cpu = Cluster((Node(4, 0),), "test")
    ppo = rlhf_plan(tiny_model_dir, cpu, "--rlhf_type", "ppo", "--reward_funcs", "accuracy", nproc=1)
    assert {r.name: r.placement.num_gpus for r in ppo.roles}["critic"] == 0
    assert sum(r.placement.num_cpus * r.placement.num_workers for r in ppo.roles) <= 4
    with pytest.raises(ArgumentError, match="--rlhf_type ppo needs a reward"):
        rlhf_plan(tiny_model_dir, cpu, "--rlhf_type", "ppo", nproc=1)
    with pytest.raises(ArgumentError, match="--rlhf_type gkd needs --teacher_model"):
        rlhf_plan(tiny_model_dir, cpu, "--rlhf_type", "gkd", nproc=1)
    with pytest.raises(ArgumentError, match="--seq_kd true: not supported"):
        rlhf_plan(tiny_model_dir, cpu, "--rlhf_type", "gkd", "--teacher_model", "/t", "--seq_kd", "true", nproc=1)
    with pytest.raises(ArgumentError, match="allows no stale rollouts"):
        rlhf_plan(tiny_model_dir, cpu, "--rlhf_type", "ppo", "--reward_funcs", "format", "--async_generate",
                  "true", nproc=1)


def test_num_mini_batches_splits_a_ppo_generation_into_optimizer_steps(tiny_model_dir):
    plan = rlhf_plan(tiny_model_dir, gpu_cluster(), "--rlhf_type", "ppo", "--reward_funcs", "accuracy",
                     "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                     "--num_mini_batches", "3", "--num_ppo_epochs", "2", units=480)
    b = plan.batch
    assert (b.optimizer_steps_per_generation, b.completions_per_generation, b.prompts_per_generation) == (3, 96, 96)
    assert plan.role("policy").config.total_steps == plan.schedule.total_steps * 3 * 2  # steps x mini-batches x epochs
