"""`swiftray megatron sft`: Megatron-SWIFT's flags and their meanings, and the reference document's
command (scripts/megatron_sft_moe.sh) run end to end on two CPU ranks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ray import REPO, ray_cluster  # noqa: F401

from swiftray import checkpoint as ckpt
from swiftray.arguments import ArgumentError
from swiftray.cli_parser import parse_args
from swiftray.megatron import convert
from swiftray.megatron.arguments import MegatronSftArguments
from swiftray.megatron.sft import policy_config, run_megatron_sft
from swiftray.models.tiny import make_tiny_model

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """(HF folder, its megatron-core conversion)."""
    root = tmp_path_factory.mktemp("megatron_cli")
    hf = make_tiny_model(root / "tiny-qwen3-moe", moe=True)
    return hf, convert.hf_to_mcore(hf, root / "tiny-qwen3-moe-mcore")


def parse(argv: list[str], monkeypatch, nproc: str = "2", **env: str) -> MegatronSftArguments:
    monkeypatch.setenv("NPROC_PER_NODE", nproc)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return parse_args(MegatronSftArguments, argv, prog="swiftray megatron sft")


def test_reference_flags_keep_their_megatron_meanings(tiny_moe, monkeypatch):
    _, mcore = tiny_moe
    args = parse(["--load", str(mcore), "--dataset", "swiftray/arithmetic#20", "--tensor_model_parallel_size", "2",
                  "--expert_model_parallel_size", "2", "--sequence_parallel", "true", "--micro_batch_size", "1",
                  "--global_batch_size", "16", "--lr", "1e-5", "--lr_warmup_iters", "100", "--min_lr", "1e-6",
                  "--train_iters", "2000", "--save_interval", "200", "--recompute_granularity", "full",
                  "--recompute_method", "uniform", "--recompute_num_layers", "1", "--no_save_optim", "true"],
                 monkeypatch)
    # 2 ranks / TP 2 = 1 data-parallel rank: 16 micro-batches of 1 sample per iteration.
    assert (args.world_size, args.data_parallel_size, args.accumulation) == (2, 1, 16)
    assert args.eval_interval == 200  # unset: --save_interval, as Megatron-SWIFT
    assert args.schedule(steps_per_epoch=3) == (2000, 100)
    config = policy_config(args, 2000, 100, "float32")
    assert config["moe_aux_loss_coeff"] == pytest.approx(0.001)  # unset: the model's router_aux_loss_coef
    assert (config["learning_rate"], config["min_lr"], config["warmup_steps"]) == (1e-5, 1e-6, 100)
    assert (config["recompute_granularity"], config["recompute_method"], config["recompute_num_layers"]) == (
        "full", "uniform", 1)
    assert config["lr_decay_steps"] is None and config["total_steps"] == 2000
    assert parse(["--load", str(mcore), "--dataset", "x", "--lr_warmup_fraction", "0.1"],
                 monkeypatch).schedule(steps_per_epoch=5) == (5, 1)  # no --train_iters: one epoch


@pytest.mark.parametrize("argv,env,message", [
    (["--dataset", "x"], {}, "--load is required"),
    (["--global_batch_size", "3"], {}, "not a multiple of --micro_batch_size"),
    (["--tensor_model_parallel_size", "4"], {}, "not a multiple of --tensor_model_parallel_size"),
    (["--context_parallel_size", "2"], {}, "only 1 is supported"),
    (["--recompute_granularity", "some"], {}, "expected full, selective or none"),
    (["--tensor_model_parallel_size", "2"], {}, "MoE model with tensor_model_parallel_size > 1 needs --sequence_parallel"),
    (["--expert_model_parallel_size", "3"], {}, "= 3 must divide data parallel x tensor parallel = 2"),
    ([], {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK='2'"),
])
def test_bad_flags_fail_with_a_reason(tiny_moe, monkeypatch, argv, env, message):
    base = [] if argv[:1] == ["--dataset"] else ["--load", str(tiny_moe[1]), "--dataset", "x"]
    with pytest.raises(ArgumentError, match=message):
        parse(base + argv, monkeypatch, **env)


def test_gpu_only_flags_are_explained_once_on_cpu(tiny_moe, monkeypatch, caplog):
    args = parse(["--load", str(tiny_moe[1]), "--dataset", "x", "--moe_grouped_gemm", "true",
                  "--use_flash_attn", "true", "--cross_entropy_loss_fusion", "true"], monkeypatch)
    with caplog.at_level(logging.INFO, logger="swiftray"):
        args.explain_gpu_only(on_gpu=False)
        args.explain_gpu_only(on_gpu=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("(CPU workers)" in line for line in lines)
    assert {line.split()[0] for line in lines} == {"--moe_grouped_gemm", "--use_flash_attn", "--cross_entropy_loss_fusion"}


def test_other_nodes_leave_the_run_to_node_zero(tiny_moe, monkeypatch, tmp_path):
    args = parse(["--load", str(tiny_moe[1]), "--dataset", "x", "--save", str(tmp_path / "out")], monkeypatch,
                 NNODES="2", NODE_RANK="1")
    assert args.world_size == 4 and run_megatron_sft(args) is None
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_reference_megatron_sft_script_runs(tiny_moe, tmp_path, ray_cluster):  # noqa: F811
    hf, _ = tiny_moe
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The run joins this session's cluster (starting one costs 20 s here); a client sends Ray's auth
    # token to an explicit address only with RAY_AUTH_MODE=token.
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), SWIFTRAY_NO_PROGRESS="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MODEL=str(hf), TRAIN_ITERS="2",
               RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "megatron_sft_moe.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for flag in ("--moe_grouped_gemm", "--use_flash_attn", "--cross_entropy_loss_fusion"):
        assert proc.stderr.count(f"{flag} true:") == 1
    assert "2 ranks = TP 2 x PP 1 x DP 1 (EP 2)" in proc.stderr
    (run,) = (tmp_path / "megatron_output" / "tiny-qwen3-moe").glob("v*-*")
    steps = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["train/num_tokens"] > 0 for s in steps)
    last = ckpt.latest_checkpoint(run)
    assert last.name == "checkpoint-2" and convert.is_mcore_dir(last)
    assert ckpt.read_args(run)["tensor_model_parallel_size"] == 2
    # --no_save_optim / --no_save_rng: the per-rank state holds neither.
    meta = json.loads((last / "train_state" / "rank_0.json").read_text())
    assert not meta["has_optim"] and not meta["has_rng"] and meta["step"] == 2
    # The checkpoint converts back to an HF folder, with trained (changed) weights.
    before = convert.SafetensorsFolder(hf, "model")
    after = convert.SafetensorsFolder(Path(f"{last}-hf"), "model")
    assert sorted(before.keys()) == sorted(after.keys())
    assert any(not torch.equal(before.get(k), after.get(k)) for k in before.keys())


def test_resume_from_a_checkpoint_continues_with_the_same_losses(tiny_model_dir, tmp_path, monkeypatch,
                                                                 ray_cluster):  # noqa: F811
    """`--load checkpoint-N --finetune false`: iteration, optimizer, RNG and data position come back."""
    common = ["--dataset", "swiftray/arithmetic#40", "--micro_batch_size", "2", "--global_batch_size", "8",
              "--train_iters", "3", "--save_interval", "2", "--log_interval", "1", "--lr", "1e-3",
              "--lr_warmup_iters", "1", "--report_to", "none", "--recompute_granularity", "none",
              "--split_dataset_ratio", "0.2", "--eval_iters", "1", "--num_cpus_per_worker", "1"]
    first = run_megatron_sft(parse(["--load", str(tiny_model_dir), "--save", str(tmp_path / "a"), *common], monkeypatch))
    resumed = run_megatron_sft(parse(["--load", str(first / "checkpoint-2"), "--finetune", "false",
                                      "--save", str(tmp_path / "b"), *common], monkeypatch))

    def losses(run: Path, key: str = "train/loss") -> dict[int, float]:
        rows = map(json.loads, (run / "logging.jsonl").read_text().splitlines())
        return {r["step"]: r[key] for r in rows if key in r}

    assert sorted(losses(first)) == [1, 2, 3] and sorted(losses(resumed)) == [3]
    assert losses(resumed)[3] == pytest.approx(losses(first)[3], abs=1e-6)
    assert losses(first)[3] != pytest.approx(losses(first)[2], abs=1e-3)  # a different batch, a different loss
    assert json.loads((resumed / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    # Evaluation on the held-out 20% at --eval_interval (= --save_interval) and at the end, same in both.
    assert sorted(losses(first, "eval/loss")) == [2, 3]
    assert losses(resumed, "eval/loss")[3] == pytest.approx(losses(first, "eval/loss")[3], abs=1e-6)
