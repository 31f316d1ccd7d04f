"""Every flag is acted on or refused (issue 9): for every field of `swiftray sft` and `swiftray rlhf`, a
different valid value gives a different run plan, unless the field is on the listed ms-swift
compatibility list (then it prints its reason and changes nothing) or its only supported value is
the default (then any other is refused at parse time, saying what is supported)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from _ray import REPO

from swiftray.algorithms import get_algorithm
from swiftray.algorithms.sft import SFT
from swiftray.arguments import ArgumentError, RlhfArguments, SftArguments
from swiftray.cli_parser import parse_args
from swiftray.compat import REFUSED_FLAGS, compat_flags
from swiftray.placement import Cluster, Node
from swiftray.plan import build_plan

CPU = Cluster((Node(4, 0),), "test")
ONE_GPU = Cluster((Node(4, 1),), "test")
# What a flag does rather than what a run is: not part of the plan.
ACTION_FLAGS = {"print_plan"}

# A valid value other than the default, for every planned field (a list: several flag words).
ALTERNATIVES: dict[str, list[str]] = {
    "model": ["/somewhere/else"], "torch_dtype": ["bfloat16"], "attn_impl": ["eager"], "use_liger_kernel": ["true"],
    "model_name": ["robot"], "model_author": ["me"], "seed": ["7"],
    "dataset": ["a.jsonl", "b.jsonl"], "val_dataset": ["v.jsonl"], "split_dataset_ratio": ["0.1"],
    "dataset_num_proc": ["2"], "dataset_shuffle": ["false"], "data_seed": ["7"], "columns": ['{"q": "query"}'],
    "strict": ["true"], "template": ["qwen3"], "system": ["be brief"], "max_length": ["512"],
    "truncation_strategy": ["left"], "loss_scale": ["last_round"], "packing": ["true"], "padding_free": ["true"],
    "train_type": ["full"], "adapters": ["/some/adapter"], "lora_rank": ["16"], "lora_alpha": ["16"],
    "lora_dropout": ["0.1"], "target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "use_dora": ["true"],
    "output_dir": ["elsewhere"], "num_train_epochs": ["1"], "max_steps": ["5"], "per_device_train_batch_size": ["2"],
    "per_device_eval_batch_size": ["2"], "gradient_accumulation_steps": ["32"], "learning_rate": ["1e-3"],
    "weight_decay": ["0.0"], "adam_beta1": ["0.8"], "adam_beta2": ["0.99"], "max_grad_norm": ["0.5"],
    "lr_scheduler_type": ["linear"], "warmup_ratio": ["0.1"], "warmup_steps": ["3"],
    "gradient_checkpointing": ["false"], "logging_steps": ["2"], "logging_first_step": ["false"],
    "eval_strategy": ["epoch"], "eval_steps": ["7"], "save_strategy": ["no"], "save_steps": ["9"],
    "save_total_limit": ["2"], "save_only_model": ["true"], "metric_for_best_model": ["accuracy"],
    "resume_from_checkpoint": ["/a/checkpoint-5"], "report_to": ["wandb"], "deepspeed": ["zero3"],
    "fsdp": ["full_shard"], "ddp_backend": ["gloo"], "ray_address": ["ray://head:10001"],
    "num_cpus_per_worker": ["0.5"], "add_version": ["false"], "ray_bind_all_interfaces": ["true"],
    "max_nonfinite_steps": ["0"],
    # RL
    "temperature": ["0.7"], "top_k": ["5"], "top_p": ["0.9"], "repetition_penalty": ["1.1"],
    "rlhf_type": ["dapo"], "ref_model": ["/a/reference"], "num_generations": ["4"], "max_completion_length": ["64"],
    "beta": ["0"], "epsilon": ["0.1"], "epsilon_high": ["0.28"], "loss_type": ["bnpo"], "scale_rewards": ["none"],
    "num_iterations": ["2"], "steps_per_generation": ["32"], "generation_batch_size": ["32"],
    "dynamic_sample": ["true"], "max_resample_times": ["1"], "overlong_filter": ["true"],
    "reward_funcs": ["accuracy", "format"], "reward_weights": ["2"], "nonfinite_reward": ["missing"],
    "external_plugins": [str(REPO / "scripts" / "plugins" / "noise_reward.py")], "soft_max_length": ["100"],
    "soft_cache_length": ["10"], "cosine_min_len_value_wrong": ["-1"], "cosine_max_len_value_wrong": ["-0.1"],
    "cosine_min_len_value_correct": ["0.9"], "cosine_max_len_value_correct": ["0.4"], "cosine_max_len": ["100"],
    "repetition_n_grams": ["2"], "repetition_max_penalty": ["-0.5"], "use_vllm": ["true"],
    "vllm_gpu_memory_utilization": ["0.5"], "vllm_max_model_len": ["1024"], "vllm_tensor_parallel_size": ["2"],
    "vllm_enable_prefix_caching": ["false"], "num_infer_workers": ["2"], "sleep_level": ["1"],
    "offload_model": ["true"], "offload_optimizer": ["true"], "gc_collect_after_offload": ["true"],
    "async_generate": ["true"], "log_completions": ["true"], "rollout_batch_size": ["1"],
    "ref_adapters": ["/some/sft-adapter"],
    # Preference learning and reward models (compared on the algorithm that reads them: BASE_FOR)
    "loss_weights": ["0.5"], "label_smoothing": ["0.1"], "rpo_alpha": ["1"], "discopop_tau": ["0.1"],
    "reference_free": ["true"], "precompute_ref_log_probs": ["true"], "simpo_gamma": ["0.5"], "cpo_alpha": ["0"],
    "desirable_weight": ["2"], "undesirable_weight": ["2"], "center_rewards_coefficient": ["0.01"],
    "max_restarts": ["0"], "memory_checkpoint_steps": ["2"], "reward_timeout": ["30"], "max_infer_workers": ["4"],
    "weight_sync": ["collective"],
    # The pool's minimum cannot exceed the engines it starts with (one by default): start with two.
    "min_infer_workers": ["2", "--num_infer_workers", "2"],
}
# Flags of one algorithm: their plan is compared with that algorithm's default plan, not GRPO's.
BASE_FOR: dict[str, list[str]] = {
    **{name: ["--rlhf_type", "dpo"] for name in ("loss_weights", "label_smoothing", "rpo_alpha", "discopop_tau",
                                                  "reference_free", "precompute_ref_log_probs")},
    "simpo_gamma": ["--rlhf_type", "simpo"], "cpo_alpha": ["--rlhf_type", "cpo"],
    "desirable_weight": ["--rlhf_type", "kto"], "undesirable_weight": ["--rlhf_type", "kto"],
    "center_rewards_coefficient": ["--rlhf_type", "rm"],
}
ALTERNATIVES.update({
    "advantage_estimator": ["rloo"], "kl_in_reward": ["true"],
    "num_mini_batches": ["2"], "local_rollout_forward_batch_size": ["8"], "response_length": ["64"],
    # PPO's and GKD's own flags, tried with that --rlhf_type (CONTEXT)
    "value_model": ["/a/value_model"], "num_ppo_epochs": ["2"], "whiten_rewards": ["true"], "kl_coef": ["0.1"],
    "cliprange": ["0.1"], "vf_coef": ["0.5"], "cliprange_value": ["0.5"], "gamma": ["0.9"], "lam": ["0.9"],
    "missing_eos_penalty": ["1.0"], "teacher_model": ["/b/teacher"], "lmbda": ["1.0"], "sft_alpha": ["0.5"],
    "gkd_logits_topk": ["16"],
    "rollout_dtype": ["bfloat16"], "rollout_quantization": ["int8"], "rollout_importance_sampling_mode": ["token_mask"],
    "rollout_importance_sampling_threshold": ["3"],
})
# Flags an algorithm reads: the plan is compared with that algorithm's default plan.
PPO_FLAGS = ("value_model", "num_ppo_epochs", "whiten_rewards", "kl_coef", "cliprange", "vf_coef", "cliprange_value",
             "gamma", "lam", "missing_eos_penalty")
GKD_FLAGS = ("teacher_model", "lmbda", "sft_alpha", "gkd_logits_topk")
CONTEXT: dict[str, list[str]] = {**{name: ["--rlhf_type", "ppo"] for name in PPO_FLAGS},
                                 **{name: ["--rlhf_type", "gkd", "--teacher_model", "/a/teacher"] for name in GKD_FLAGS},
                                 "rollout_importance_sampling_threshold": ["--rollout_importance_sampling_mode",
                                                                           "token_truncate"]}
COMMANDS = {"sft": (SftArguments, []), "rlhf": (RlhfArguments, ["--reward_funcs", "accuracy"])}


def plan_of(command: str, *flags: str, cluster: Cluster = CPU, model: Path):
    cls, base = COMMANDS[command]
    args = parse_args(cls, ["--model", str(model), "--dataset", "d.jsonl", *base, *flags])
    algorithm = SFT() if command == "sft" else get_algorithm(args.rlhf_type).from_args(args)
    return dataclasses.replace(build_plan(args, algorithm, cluster, 100, command), notes=())


def field_names(command: str) -> list[str]:
    return [f.name for f in dataclasses.fields(COMMANDS[command][0])]


@pytest.mark.parametrize("command", ["sft", "rlhf"])
def test_every_field_changes_the_plan_or_is_listed(command, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu_base = plan_of(command, cluster=ONE_GPU, model=tiny_model_dir)
    base = plan_of(command, model=tiny_model_dir)
    # A reward model must be a model folder sharing the policy's tokenizer.
    alternatives = {**ALTERNATIVES, "reward_model": [str(tiny_model_dir)]}
    unchanged, unaccounted = [], []
    for name in field_names(command):
        if name in compat_flags(command) or name in REFUSED_FLAGS or name in ACTION_FLAGS:
            continue
        if name not in alternatives:
            unaccounted.append(name)
            continue
        # nccl is the GPU default, so the other valid value (gloo) is tried on a GPU cluster.
        on_gpu = name == "ddp_backend"
        context = (BASE_FOR.get(name) or CONTEXT.get(name, [])) if command == "rlhf" else []
        reference = plan_of(command, *context, model=tiny_model_dir) if context else (gpu_base if on_gpu else base)
        other = plan_of(command, *context, f"--{name}", *alternatives[name], cluster=ONE_GPU if on_gpu else CPU,
                        model=tiny_model_dir)
        if other == reference:
            unchanged.append(name)
    assert not unaccounted, f"fields with no alternative value in this test: {unaccounted}"
    assert not unchanged, f"flags that do not change the plan and are not on the compatibility list: {unchanged}"


@pytest.mark.parametrize("command", ["sft", "rlhf"])
def test_compatibility_flags_print_their_reason_and_change_nothing(command, tiny_model_dir, caplog, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    base = plan_of(command, model=tiny_model_dir)
    cls, extra = COMMANDS[command]
    values = {"dataloader_num_workers": "4", "use_hf": "true", "hub_token": "hf_x", "model_type": "qwen3",
              "loss_scale": "last_round", "packing": "true", "padding_free": "true", "max_new_tokens": "8",
              "stream": "true", "infer_backend": "vllm", "per_device_eval_batch_size": "4",
                  "num_sample_generations": "2"}
    for name, reason in compat_flags(command).items():
        args = parse_args(cls, ["--model", str(tiny_model_dir), "--dataset", "d.jsonl", *extra, f"--{name}", values[name]])
        algorithm = SFT() if command == "sft" else get_algorithm(args.rlhf_type).from_args(args)
        plan = build_plan(args, algorithm, CPU, 100, command)
        assert f"--{name} has no effect here: {reason}" in plan.notes
        assert dataclasses.replace(plan, notes=()) == base, name


def test_refused_values_fail_at_parse_time_saying_what_is_supported(tiny_model_dir):
    for flags, message in [(["--streaming", "true"], "--streaming true: not supported"),
                           (["--vllm_mode", "server"], "--vllm_mode server: not supported yet; the default, colocate"),
                           (["--vllm_server_host", "h"], "--vllm_server_host: only for --vllm_mode server"),
                           (["--vllm_server_port", "9000"], "--vllm_server_port: only for --vllm_mode server"),
                           (["--deepspeed", "zero1"], "--deepspeed 'zero1': expected zero2, zero3"),
                           (["--model_type", "llama"], "--model_type llama: .*config.json says model_type 'qwen3'")]:
        with pytest.raises(ArgumentError, match=re.escape(message) if "*" not in message else message):
            plan_of("rlhf", *flags, model=tiny_model_dir)
    assert set(REFUSED_FLAGS) <= set(field_names("rlhf"))


def test_readme_lists_every_compatibility_flag_with_its_reason():
    readme = (REPO / "README.md").read_text()
    for name, reason in {**compat_flags("rlhf"), **REFUSED_FLAGS}.items():
        assert f"`--{name}`" in readme and reason in readme, name


def test_print_plan_shows_the_notes_of_flags_without_effect(tiny_model_dir, capsys):
    from swiftray.controller.common import plan_or_print

    args = parse_args(SftArguments, ["--model", str(tiny_model_dir), "--dataset", "d", "--use_hf", "true",
                                     "--print_plan", "true"])
    assert plan_or_print(args, SFT(), 10, "sft") is None  # printed, started nothing
    assert f"note: --use_hf has no effect here: {compat_flags('sft')['use_hf']}" in capsys.readouterr().out
