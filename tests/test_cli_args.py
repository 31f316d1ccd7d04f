"""The command line: ms-swift's flags, names, defaults, config files, and errors on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from swiftray.algorithms import GKD, GRPO, PPO, get_algorithm
from swiftray.arguments import (
    ArgumentError,
    ExportArguments,
    InferArguments,
    RlhfArguments,
    SftArguments,
)
from swiftray.cli_parser import build_parser, parse_args

REFERENCE_SFT = """
    --model M --train_type lora --dataset 'swift/Qwen3-SFT-Mixin#2000' 'swift/self-cognition:qwen3#600'
    --torch_dtype bfloat16 --num_train_epochs 1 --per_device_train_batch_size 1
    --per_device_eval_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32
    --target_modules all-linear --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50
    --save_total_limit 2 --logging_steps 5 --max_length 2048 --output_dir output --warmup_ratio 0.05
    --dataloader_num_workers 4 --model_author swift --model_name swift-robot
"""
REFERENCE_FULL = """
    --model M --train_type full --dataset D --torch_dtype bfloat16 --per_device_train_batch_size 1
    --per_device_eval_batch_size 1 --learning_rate 1e-5 --gradient_accumulation_steps 4 --packing true
    --eval_steps 100 --save_steps 100 --logging_steps 5 --max_length 8192 --warmup_ratio 0.05
    --dataloader_num_workers 8 --dataset_num_proc 8 --save_total_limit 2 --save_only_model true
    --output_dir output --deepspeed zero3 --use_liger_kernel true --attn_impl flash_attn
"""
REFERENCE_GRPO = """
    --rlhf_type grpo --model M --train_type full --dataset 'AI-MO/NuminaMath-TIR#5000' --torch_dtype bfloat16
    --num_train_epochs 1 --per_device_train_batch_size 2 --per_device_eval_batch_size 2 --learning_rate 1e-6
    --save_total_limit 2 --logging_steps 5 --output_dir output --gradient_accumulation_steps 1
    --warmup_ratio 0.05 --dataloader_num_workers 4 --max_completion_length 4096 --vllm_max_model_len 8192
    --reward_funcs accuracy --num_generations 16 --use_vllm true --vllm_gpu_memory_utilization 0.4
    --sleep_level 1 --offload_model true --offload_optimizer true --gc_collect_after_offload true
    --deepspeed zero3 --num_infer_workers 8 --tensor_parallel_size 1 --temperature 1.0 --top_p 0.85
    --log_completions true --overlong_filter true
"""


def split(text: str) -> list[str]:
    return [t.strip("'") for t in text.split()]


def test_reference_sft_command_parses_with_its_meaning():
    args = parse_args(SftArguments, split(REFERENCE_SFT))
    assert args.train_type == "lora" and args.lora_rank == 8 and args.lora_alpha == 32
    assert args.dataset == ["swift/Qwen3-SFT-Mixin#2000", "swift/self-cognition:qwen3#600"]
    assert args.gradient_accumulation_steps == 16 and args.max_length == 2048
    assert args.model_name == ["swift-robot"] and args.model_author == ["swift"]
    assert args.target_modules == ["all-linear"] and args.warmup_ratio == 0.05


def test_reference_full_and_grpo_commands_parse():
    full = parse_args(SftArguments, split(REFERENCE_FULL))
    assert full.packing is True and full.deepspeed == "zero3" and full.save_only_model is True
    grpo = parse_args(RlhfArguments, split(REFERENCE_GRPO))
    assert grpo.num_generations == 16 and grpo.use_vllm is True and grpo.sleep_level == 1
    assert grpo.vllm_tensor_parallel_size == 1 and grpo.num_infer_workers == 8
    assert grpo.top_p == 0.85 and grpo.overlong_filter is True and grpo.reward_funcs == ["accuracy"]


def test_ms_swift_defaults():
    args = parse_args(SftArguments, ["--model", "m", "--dataset", "d"])
    assert args.train_type == "lora" and args.learning_rate == 1e-4
    assert args.num_train_epochs == 3 and args.per_device_train_batch_size == 1
    assert args.gradient_accumulation_steps == 16  # ceil(16 / (1 x 1 worker))
    assert args.eval_steps == args.save_steps == 500 and args.logging_steps == 5
    assert args.truncation_strategy == "delete" and args.loss_scale == "default"
    assert args.lora_rank == 8 and args.lora_alpha == 32 and args.lora_dropout == 0.05
    assert args.seed == 42 and args.data_seed == 42 and args.max_steps == -1
    full = parse_args(SftArguments, ["--model", "m", "--dataset", "d", "--train_type", "full"])
    assert full.learning_rate == 1e-5
    grpo = parse_args(RlhfArguments, ["--model", "m", "--dataset", "d"])
    assert grpo.beta == 0.04 and grpo.epsilon == 0.2 and grpo.epsilon_high is None  # the algorithm resolves it
    assert grpo.metric_for_best_model == "reward"  # RL evaluates rewards (ms-swift's GRPO default)
    assert grpo.num_generations == 8 and grpo.advantage_estimator == "grpo"
    assert grpo.loss_type is None and get_algorithm("grpo").from_args(grpo).loss_type == "grpo"  # the algorithm's
    algo = GRPO.from_args(grpo)
    assert algo.beta == 0.04 and algo.scale_rewards == "group" and algo.kl_in_reward is False
    # ms-swift ties --scale_rewards and --kl_in_reward to the estimator
    for estimator, scale in (("rloo", "none"), ("reinforce_plus_plus", "batch")):
        algo = GRPO.from_args(parse_args(RlhfArguments, ["--model", "m", "--dataset", "d", "--advantage_estimator",
                                                         estimator]))
        assert algo.scale_rewards == scale and algo.kl_in_reward is True and algo.annotate_with_policy
    # PPO's (TRL's) and GKD's defaults
    ppo = PPO.from_args(parse_args(RlhfArguments, ["--model", "m", "--dataset", "d", "--rlhf_type", "ppo",
                                                   "--reward_funcs", "accuracy"]))
    assert (ppo.num_iterations, ppo.kl_coef, ppo.cliprange, ppo.vf_coef, ppo.cliprange_value, ppo.gamma, ppo.lam,
            ppo.whiten_rewards, ppo.missing_eos_penalty) == (4, 0.05, 0.2, 0.1, 0.2, 1.0, 0.95, False, None)
    assert ppo.num_generations == 1 and ppo.default_temperature == 0.9
    gkd = GKD.from_args(parse_args(RlhfArguments, ["--model", "m", "--dataset", "d", "--rlhf_type", "gkd",
                                                   "--teacher_model", "t"]))
    assert (gkd.beta, gkd.temperature, gkd.lmbda, gkd.sft_alpha, gkd.num_generations) == (0.5, 0.9, 0.5, 0.0, 1)


def test_tuner_type_is_the_newer_name_of_train_type():
    args = parse_args(SftArguments, ["--model", "m", "--dataset", "d", "--tuner_type", "full"])
    assert args.train_type == "full"


def test_unknown_flag_names_the_closest(capsys):
    with pytest.raises(SystemExit):
        parse_args(SftArguments, ["--model", "m", "--dataset", "d", "--lora_rnak", "4"])
    assert "--lora_rank" in capsys.readouterr().err


def test_bad_values_fail_with_the_flag_name():
    with pytest.raises(ArgumentError, match="--train_type"):
        parse_args(SftArguments, ["--model", "m", "--dataset", "d", "--train_type", "ful"])
    with pytest.raises(ArgumentError, match="--loss_scale part 'ignore_think'"):
        parse_args(SftArguments, ["--model", "m", "--dataset", "d", "--loss_scale", "last_round+ignore_think"])
    with pytest.raises(ArgumentError, match="--deepspeed"):
        parse_args(SftArguments, ["--model", "m", "--dataset", "d", "--deepspeed", "zero4"])
    with pytest.raises(ArgumentError, match="--reward_weights"):
        parse_args(RlhfArguments, ["--model", "m", "--dataset", "d", "--reward_funcs", "accuracy",
                                   "--reward_weights", "1", "2"])


def test_config_file_stands_in_for_flags_and_flags_win(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: m\ndataset: [a.jsonl, b.jsonl]\nlora_rank: 4\ntuner_type: full\npacking: true\n")
    args = parse_args(SftArguments, [str(cfg), "--lora_rank", "16"])
    assert args.dataset == ["a.jsonl", "b.jsonl"] and args.lora_rank == 16
    assert args.train_type == "full" and args.packing is True
    as_json = tmp_path / "cfg.json"
    as_json.write_text(json.dumps({"model": "m", "dataset": "a.jsonl", "max_steps": 3}))
    assert parse_args(SftArguments, [str(as_json)]).max_steps == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndataset: d\nlora_rnk: 4\n")
    with pytest.raises(ArgumentError, match=r"bad.yaml: unknown field 'lora_rnk'; did you mean 'lora_rank'"):
        parse_args(SftArguments, [str(bad)])
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("model: m\ndataset: d\nlora_rank: many\n")
    with pytest.raises(ArgumentError, match="wrong.yaml: field 'lora_rank'"):
        parse_args(SftArguments, [str(wrong_type)])


def test_launch_environment_sizes_the_policy_group(monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    args = parse_args(SftArguments, ["--model", "m", "--dataset", "d", "--per_device_train_batch_size", "1"])
    assert args.world_size == 8 and args.gradient_accumulation_steps == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ArgumentError, match="NPROC_PER_NODE=4 but CUDA_VISIBLE_DEVICES"):
        parse_args(SftArguments, ["--model", "m", "--dataset", "d"])
    monkeypatch.setenv("NPROC_PER_NODE", "two")
    with pytest.raises(ArgumentError, match="NPROC_PER_NODE='two'"):
        parse_args(SftArguments, ["--model", "m", "--dataset", "d"])


@pytest.mark.parametrize("cls", [SftArguments, RlhfArguments, InferArguments, ExportArguments])
def test_help_gives_every_flag_a_meaning(cls):
    parser, flags = build_parser(cls, "swiftray")
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help",):
            assert action.help and len(action.help.split()) >= 3, action.dest
    assert "--model " in text and "(default:" in text


def test_infer_reads_base_model_from_adapter_args(tmp_path):
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    (ckpt / "args.json").write_text(json.dumps({"model": "/models/base", "system": "be brief"}))
    args = parse_args(InferArguments, ["--adapters", str(ckpt)])
    assert args.model == "/models/base" and args.system == "be brief" and args.temperature == 0.0
    with pytest.raises(ArgumentError, match="no args.json"):
        parse_args(InferArguments, ["--adapters", str(tmp_path)])


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "swiftray", "sft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and re.search(r"--per_device_train_batch_size", out.stdout)
    bad = subprocess.run([sys.executable, "-m", "swiftray", "sft", "--model", "m", "--datset", "d"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean --dataset" in bad.stderr
