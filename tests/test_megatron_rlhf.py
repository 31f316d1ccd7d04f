"""`swiftray megatron rlhf --rlhf_type grpo`: the RL loop with a Megatron policy on two CPU ranks.

One GRPO run (tiny Qwen3-MoE, TP 2 with sequence parallel and EP 2, `--load` a megatron-core folder)
serves the end-to-end tests: it trains two steps, and around every weight sync the rollout engine's
log-probs of its own samples are compared with the Megatron policy's (the run's own RLStep, measured
as tests/test_vllm_grpo.py does). The plan tests start nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from _ray import REPO, ray_cluster  # noqa: F401
from transformers import AutoTokenizer

from swiftray.arguments import ArgumentError
from swiftray.cli_parser import parse_args
from swiftray.controller import rl
from swiftray.experience import sequences_batch, tokens_to_completion_values
from swiftray.megatron import convert
from swiftray.megatron.rlhf import MegatronRlhfArguments, run_megatron_rlhf
from swiftray.models.generation import SamplingParams
from swiftray.models.tiny import make_tiny_model

torch.set_num_threads(1)
ATOL = 1e-4  # megatron-core's forward against transformers', both float32
TP2_SP_EP2 = ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--expert_model_parallel_size", "2"]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """(HF folder, its megatron-core conversion, a two-prompt dataset)."""
    root = tmp_path_factory.mktemp("megatron_rlhf")
    hf = make_tiny_model(root / "tiny-qwen3-moe", moe=True)
    data = root / "math.jsonl"  # NuminaMath-TIR's columns
    data.write_text("".join(json.dumps({"problem": p, "solution": f"$\\boxed{{{s}}}$"}) + "\n"
                            for p, s in (("What is 2 + 2?", 4), ("What is 3 + 4?", 7))))
    return hf, convert.hf_to_mcore(hf, root / "tiny-qwen3-moe-mcore"), data


def parse(argv: list[str], monkeypatch, nproc: str = "2") -> MegatronRlhfArguments:
    monkeypatch.setenv("NPROC_PER_NODE", nproc)
    return parse_args(MegatronRlhfArguments, argv, prog="swiftray megatron rlhf")


def grpo_argv(load: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--rlhf_type", "grpo", "--load", str(load), "--dataset", str(data), "--save", str(out),
            "--reward_funcs", "accuracy", "repetition", "--num_generations", "4", "--micro_batch_size", "2",
            "--global_batch_size", "4", "--train_iters", "2", "--max_completion_length", "8", *extra]


def test_megatron_flags_set_the_rl_batch(tiny_moe, monkeypatch, tmp_path):
    hf, mcore, data = tiny_moe
    args = parse(grpo_argv(mcore, data, tmp_path, "--expert_model_parallel_size", "2", "--lr", "3e-6",
                           "--lr_warmup_iters", "1", "--clip_grad", "0.5", "--global_batch_size", "8"), monkeypatch)
    # 2 ranks, TP = PP = 1: DP 2; 8 completions per step = 2 per micro-batch x 2 ranks x 2 accumulation.
    assert (args.data_parallel_size, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2, 2)
    assert (args.learning_rate, args.warmup_steps, args.max_grad_norm, args.max_steps) == (3e-6, 1, 0.5, 2)
    assert args.train_type == "full" and args.output_dir == str(tmp_path) and args.data_ranks() == (0, 1)
    assert parse(grpo_argv(hf, data, tmp_path, *TP2_SP_EP2), monkeypatch).data_ranks() == (0, 0)


def test_a_bf16_rollout_gets_weights_the_megatron_policy_cast(tiny_moe, monkeypatch, tmp_path):
    from swiftray.algorithms import get_algorithm
    from swiftray.placement import Cluster, Node
    from swiftray.plan import build_plan

    args = parse(grpo_argv(tiny_moe[1], tiny_moe[2], tmp_path, "--rollout_dtype", "bfloat16"), monkeypatch)
    plan = build_plan(args, get_algorithm("grpo").from_args(args), Cluster((Node(4, 0),), "test"), 4, "rlhf")
    policy, rollout = plan.role("policy").config, plan.role("rollout").config
    assert (policy.backend, policy.torch_dtype, policy.engine_dtype) == ("megatron", "float32", "bfloat16")
    assert rollout.torch_dtype == "bfloat16" and rollout.return_logprobs


@pytest.mark.parametrize("extra,message", [
    (["--global_batch_size", "3"], "--global_batch_size 3 is not a multiple of --micro_batch_size"),
    (["--deepspeed", "zero3"], "--deepspeed: the policy trains with megatron-core"),
    (["--train_type", "lora"], "--train_type lora: expected one of full"),
    (["--tensor_model_parallel_size", "2"], "needs --sequence_parallel"),
    (["--pipeline_model_parallel_size", "4"], "not a multiple of --tensor_model_parallel_size x"),
])
def test_bad_flags_fail_with_a_reason(tiny_moe, monkeypatch, tmp_path, extra, message):
    with pytest.raises(ArgumentError, match=message):
        parse(grpo_argv(tiny_moe[1], tiny_moe[2], tmp_path, *extra), monkeypatch)


def test_data_ranks_follow_megatron_cores_rank_order():
    """Each rank's data shard is its data-parallel rank in megatron-core's own groups (RankGenerator)."""
    code = """
import json
from swiftray.megatron import cpu_shim
cpu_shim.install()
from megatron.core.parallel_state import RankGenerator
out = {}
for tp, pp, dp in ((2, 1, 1), (1, 1, 2), (2, 2, 2), (2, 1, 4), (1, 4, 2)):
    dp_rank = {}
    for group in RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp").get_ranks("dp"):
        dp_rank.update({rank: i for i, rank in enumerate(group)})
    out[f"{tp},{pp},{dp}"] = [dp_rank[r] for r in range(tp * pp * dp)]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads(proc.stdout.splitlines()[-1])
    for key, ranks in expected.items():
        tp, pp, dp = map(int, key.split(","))
        args = MegatronRlhfArguments(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        args.world_size, args.data_parallel_size = tp * pp * dp, dp
        assert list(args.data_ranks()) == ranks, key


@pytest.mark.parametrize("layout,shown", [
    (TP2_SP_EP2, "megatron-core: 2 ranks = TP 2 x PP 1 x DP 1 (EP 2, sequence parallel, distributed optimizer); "
                 "data shard of each rank [0, 0]"),
    (["--expert_model_parallel_size", "2"], "megatron-core: 2 ranks = TP 1 x PP 1 x DP 2 (EP 2, distributed "
                                            "optimizer); data shard of each rank [0, 1]"),
])
def test_print_plan_shows_the_megatron_policy_ranks(tiny_moe, monkeypatch, tmp_path, capsys, layout, shown):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # plan for the launch environment: nothing starts
    args = parse(grpo_argv(tiny_moe[1], tiny_moe[2], tmp_path / "out", *layout, "--print_plan", "true"), monkeypatch)
    assert run_megatron_rlhf(args) is None
    printed = capsys.readouterr().out
    assert "policy     2 worker(s)" in printed and "; megatron" in printed and shown in printed
    dp = 1 if "DP 1" in shown else 2
    assert f"batch: 2 per rank x {dp} rank(s) x {2 // dp} accumulation = 4 completions" in printed
    assert not (tmp_path / "out").exists()  # nothing converted, nothing written


class SyncCheckingStep(rl.RLStep):
    """The run's own step, measuring around every weight sync how far the rollout engine's log-probs of
    its own samples are from the Megatron policy's: `gaps[version] = (just before, just after)`."""

    gaps: dict[int, tuple[float, float]] = {}
    transports: list[dict[str, int]] = []
    layout: dict[str, list] = {}

    def __init__(self, plan, roles, pad_token_id: int, run_dir=None):
        super().__init__(plan, roles, pad_token_id, run_dir)
        tokenizer = AutoTokenizer.from_pretrained(plan.model)
        self.pad_id = tokenizer.pad_token_id
        self.probe = [{"prompt_ids": tokenizer.encode("What is 2 + 2?")}]
        ranks = ray.get(roles["policy"].call_all("layout"))
        type(self).layout = {"planned": list(plan.role("policy").data_ranks),
                             "megatron": [r["dp_rank"] for r in ranks], "tp": [r["tp_rank"] for r in ranks]}

    def sync_weights(self, version: int) -> float:
        before = self.logprob_gap()
        seconds = super().sync_weights(version)
        self.gaps[version] = (before, self.logprob_gap())
        self.transports.append(dict(self.weights.last))
        return seconds

    def logprob_gap(self) -> float:
        rollout = self.roles["rollout"].actors[0]
        batch = ray.get(rollout.generate.remote(self.probe, SamplingParams(max_new_tokens=8, temperature=1.0, n=4), 0))
        rows = ray.put(sequences_batch(batch.prompt_ids, batch.completion_ids, self.pad_id))
        per_rank = ray.get(self.roles["policy"].call_all("compute_logprobs", rows))  # a collective: every rank
        assert all(torch.equal(lp, per_rank[0]) for lp in per_rank)
        policy = tokens_to_completion_values(per_rank[0], [len(p) for p in batch.prompt_ids],
                                             [len(c) for c in batch.completion_ids])
        engine = ray.get(rollout.sequence_logprobs.remote(batch.prompt_ids, batch.completion_ids))
        return max(abs(a - b) for pa, ea in zip(policy, engine) for a, b in zip(pa, ea))


@pytest.fixture(scope="module")
def megatron_grpo_run(ray_cluster, tiny_moe, tmp_path_factory):  # noqa: F811
    """Two GRPO steps, TP 2 + SP + EP 2, --load the megatron-core folder; returns the run folder. A learning
    rate that visibly moves the weights in one step, so that a sync that did nothing would show."""
    _, mcore, data = tiny_moe
    out = tmp_path_factory.mktemp("megatron_grpo") / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(rl, "RLStep", SyncCheckingStep)
    try:
        args = parse(grpo_argv(mcore, data, out, *TP2_SP_EP2, "--lr", "1e-2", "--torch_dtype", "float32",
                               "--log_interval", "1", "--report_to", "none", "--log_completions", "true",
                               "--num_cpus_per_worker", "0.5"), mp)
        yield run_megatron_rlhf(args)
    finally:
        mp.undo()


def test_megatron_grpo_trains_two_steps(megatron_grpo_run: Path):
    run = megatron_grpo_run
    assert (run.parent / "tiny-qwen3-moe-mcore-hf" / "config.json").is_file()  # --load converted for the engines
    lines = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [1, 2]
    for line in train:
        assert all(math.isfinite(line[k]) for k in ("train/loss", "train/grad_norm", "train/reward", "train/kl"))
        assert line["train/num_tokens"] > 0 and line["train/grad_norm"] > 0
        assert "train/rewards/accuracy/mean" in line and "train/rewards/repetition/mean" in line
    assert train[1]["train/rollout/version"] == 1.0
    assert len((run / "completions.jsonl").read_text().splitlines()) == 8
    # TP peers share one data shard: the plan's shard of each rank is megatron-core's data-parallel rank.
    assert SyncCheckingStep.layout == {"planned": [0, 0], "megatron": [0, 0], "tp": [0, 1]}
    last = run / "checkpoint-2"
    assert convert.is_mcore_dir(last) and (last / "train_state" / "rank_1.json").is_file()


def test_rollout_logprobs_equal_the_megatron_policy_after_every_sync(megatron_grpo_run: Path):
    gaps = SyncCheckingStep.gaps
    assert sorted(gaps) == [0, 1, 2]  # the start, then once per step
    assert all(after < ATOL for _, after in gaps.values()), gaps
    assert gaps[1][0] > 10 * ATOL and gaps[2][0] > 10 * ATOL, gaps  # trained: stale engine weights would show
    assert all(t == {"shared_memory": 1} for t in SyncCheckingStep.transports)  # the engine on rank 0's node
