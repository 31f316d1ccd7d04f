"""The RL driver loop, run in-process on the tiny model: what crosses the driver, metrics, num_iterations,
async generation and its staleness bound, dynamic sampling's counts, a step with a non-finite loss,
and the reference GRPO command.

Each run is small (2-3 steps, 8 completions); the module's runs share the session's Ray cluster.
"""

from __future__ import annotations

import json
import math
import pickle
import shlex
from pathlib import Path

import pytest
import ray
import torch
from _ray import REPO, ray_cluster  # noqa: F401
from safetensors.torch import load_file

from swiftray.actors.group import ActorGroup
from swiftray.algorithms.grpo import GRPO
from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args
from swiftray.controller import rl
from swiftray.controller.rl_tasks import make_step_batch
from swiftray.experience import RolloutBatch
from swiftray.models.token_stats import token_entropy
from swiftray.plan import BatchPlan

torch.set_num_threads(1)

PLUGIN = '''
import json
import pathlib

from swiftray.rewards import register_reward

CALLS = pathlib.Path(__file__).with_suffix(".calls.jsonl")


@register_reward("varied")
def varied(completions, **kwargs):
    """Different within every group of 4: the position in the group, plus a little length."""
    return [float(i % 4) + 0.01 * len(c) for i, c in enumerate(completions)]


HUGE_CALLS = []


@register_reward("huge_at_second_call")
def huge_at_second_call(completions, **kwargs):
    """`varied`, except on its second call: finite values that overflow GRPO's float32 advantages."""
    HUGE_CALLS.append(len(completions))
    scale = 1e300 if len(HUGE_CALLS) == 2 else 1.0
    return [scale * (float(i % 4) + 0.01 * len(c)) for i, c in enumerate(completions)]


@register_reward("flat_if_even")
def flat_if_even(completions, solution, **kwargs):
    """A constant for prompts whose answer is even (dynamic sampling must drop them)."""
    with CALLS.open("a") as f:
        f.write(json.dumps(solution) + "\\n")
    return [0.5 if int(s) % 2 == 0 else float(i % 4) for i, s in enumerate(solution)]
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugins") / "loop_rewards.py"
    path.write_text(PLUGIN)
    return path


def run(out: Path, model: Path, *flags: str, plugin: Path | None = None) -> tuple[Path, list[dict]]:
    """One in-process `swiftray rlhf` run; (run folder, train lines of logging.jsonl)."""
    argv = ["--rlhf_type", "grpo", "--model", str(model), "--dataset", "swiftray/arithmetic#64",
            "--train_type", "full", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "12",
            "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no",
            "--beta", "0", "--reward_funcs", "varied", *flags]
    if plugin is not None:
        argv += ["--external_plugins", str(plugin)]
    run_dir = rl.run_rlhf(parse_args(RlhfArguments, argv))
    lines = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return run_dir, [line for line in lines if "train/loss" in line]


# ------------------------------------------------------------------ main run: refs only, metrics, iterations


def find_data(value, path="result"):
    """Where a driver-side value holds batch data (tensors, rollouts, token rows), else None."""
    if isinstance(value, (torch.Tensor, RolloutBatch)):
        return f"{path}: {type(value).__name__}"
    if isinstance(value, dict):
        if "input_ids" in value or "completion_ids" in value:
            return f"{path}: a dict of token rows"
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = find_data(item, f"{path}[{key!r}]")
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def main_run(ray_cluster, tiny_model_dir, plugin, tmp_path_factory):  # noqa: F811
    """Async generation, KL on, two iterations per batch with a large learning rate, completions logged;
    the driver spied on: what it fetches and puts, what it hands the policy, when it generates and trains."""
    seen = {"gets": [], "puts": [], "ranked": [], "step_batch_args": [], "events": []}
    real_get, real_put = ray.get, ray.put
    real_ranked = ActorGroup.call_all_ranked
    real_step_batch = rl.make_step_batch
    real_generate, real_train = rl.RLStep.generate, rl.RLStep.train

    def generate(self, *a, **kw):
        seen["events"].append("generate")
        return real_generate(self, *a, **kw)

    def train(self, *a, **kw):
        seen["events"].append("train")
        return real_train(self, *a, **kw)

    def get(refs, *a, **kw):
        result = real_get(refs, *a, **kw)
        seen["gets"].append((find_data(result), len(pickle.dumps(result))))
        return result

    def put(value, *a, **kw):
        seen["puts"].append(find_data(value))
        return real_put(value, *a, **kw)

    def ranked(self, method, per_rank_args, *a, **kw):
        seen["ranked"].append((self.name, method, list(per_rank_args)))
        return real_ranked(self, method, per_rank_args, *a, **kw)

    class StepBatchSpy:
        def options(self, **kw):
            opts = real_step_batch.options(**kw)

            class Remote:
                @staticmethod
                def remote(*args):
                    seen["step_batch_args"].append(args)
                    return opts.remote(*args)

            return Remote()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "get", get)
        mp.setattr(ray, "put", put)
        mp.setattr(ActorGroup, "call_all_ranked", ranked)
        mp.setattr(rl, "make_step_batch", StepBatchSpy())
        mp.setattr(rl.RLStep, "generate", generate)
        mp.setattr(rl.RLStep, "train", train)
        run_dir, train = run(tmp_path_factory.mktemp("main"), tiny_model_dir, "--beta", "0.04",
                             "--async_generate", "true", "--max_steps", "3",
                             "--num_iterations", "2", "--learning_rate", "2e-2", "--lr_scheduler_type", "constant",
                             "--log_completions", "true", plugin=plugin)
    return run_dir, train, seen


def test_driver_passes_only_refs_and_gets_only_small_summaries(main_run):
    _, train, seen = main_run
    assert len(train) == 3
    assert seen["gets"] and not [g for g in seen["gets"] if g[0]], "the driver fetched batch data"
    assert max(size for _, size in seen["gets"]) < 64 << 10
    assert not [p for p in seen["puts"] if p], "the driver put batch data into the object store"
    for args in seen["step_batch_args"]:  # (algorithm, refs, ...): rollouts arrive as refs only
        assert args[1] and all(isinstance(r, ray.ObjectRef) for r in args[1])
    policy_calls = [(m, a) for name, m, a in seen["ranked"] if name == "policy"]
    assert policy_calls and all(isinstance(x, ray.ObjectRef) for _, a in policy_calls for x in a)


def test_each_batch_is_trained_num_iterations_times_against_old_logprobs(main_run):
    _, train, seen = main_run
    calls = [(m, [r.hex() for r in a]) for name, m, a in seen["ranked"] if name == "policy"]
    methods = [m for m, _ in calls]
    assert methods == ["compute_logprobs", "train_step", "train_step"] * 3
    for step in range(3):
        _, train1, train2 = calls[3 * step:3 * step + 3]
        assert train1[1] == train2[1]  # the same shard (with its old log-probs) both times
    for line in train:
        # Iteration 1 is on-policy (ratio exactly 1); after a large update, iteration 2 clips.
        assert line["train/iter1/clip_ratio/region_mean"] == 0.0
        assert line["train/iter2/clip_ratio/region_mean"] > 0.0
        assert line["train/iter1/loss"] != line["train/iter2/loss"]
    # The reference is the starting policy: before the first update their KL is zero (up to rounding),
    # after it the policy has moved away.
    assert train[0]["train/iter1/kl"] < 1e-6
    assert all(line["train/iter2/kl"] > 1e-4 for line in train)
    assert all(line["train/iter1/kl"] > 1e-4 for line in train[1:])


def test_metrics_and_completions_are_logged(main_run):
    run_dir, train, _ = main_run
    keys = ["train/rewards/varied/mean", "train/rewards/varied/std", "train/reward", "train/reward_std",
            "train/kl", "train/clip_ratio/low_mean", "train/clip_ratio/high_mean", "train/clip_ratio/region_mean",
            "train/entropy/mean", "train/completions/mean_length", "train/completions/max_length",
            "train/completions/clipped_ratio", "train/time/generate_s", "train/time/score_s",
            "train/time/reference_s", "train/time/train_s", "train/time/sync_weights_s", "train/staleness",
            "train/rollout/version"]
    for line in train:
        missing = [k for k in keys if k not in line]
        assert not missing, missing
        assert 0 <= line["train/completions/clipped_ratio"] <= 1
        assert 0 < line["train/entropy/mean"] <= math.log(2000) + 1e-3  # at most log(vocab)
        assert 1 <= line["train/completions/mean_length"] <= line["train/completions/max_length"] <= 12
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["step"] for r in rows} == {1, 2, 3}
    for step, line in enumerate(train, start=1):
        rewards = [r["reward"] for r in rows if r["step"] == step]
        assert line["train/reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
        assert all(r["reward"] == r["varied"] for r in rows)


def test_a_nonfinite_step_leaves_the_weights_and_the_engine_samples_on(
        ray_cluster, tiny_model_dir, plugin, tmp_path):  # noqa: F811
    # Step 2's rewards are finite (1e300) but overflow the float32 advantages: its loss is NaN.
    run_dir, lines = run(tmp_path, tiny_model_dir, "--max_steps", "3", "--reward_funcs", "huge_at_second_call",
                         "--save_strategy", "steps", "--save_steps", "1", "--log_completions", "true",
                         plugin=plugin)
    assert [line["train/skipped_nonfinite"] for line in lines] == [0.0, 1.0, 0.0]
    assert not math.isfinite(lines[1]["train/loss"])
    assert math.isfinite(lines[2]["train/loss"]) and lines[2]["train/reward"] < 4
    weights = [load_file(run_dir / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the skipped step changed nothing
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # the next one trained
    # The engine, synced with the unchanged weights, still samples: step 3's completions are all there.
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    third = [r for r in rows if r["step"] == 3]
    assert len(third) == 8 and all(math.isfinite(r["reward"]) and r["reward"] < 4 for r in third)
    assert [line["train/rollout/version"] for line in lines] == [0.0, 1.0, 2.0]


def test_token_entropy_matches_float64_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float32) * 3
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    got = token_entropy(logits, mask)
    for b in range(2):
        for t in range(4):
            p = torch.softmax(logits[b, t].double(), -1)
            expected = float(-(p * p.log()).sum()) if mask[b, t] else 0.0
            assert float(got[b, t]) == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------ async generation (main run) and staleness


def test_async_generates_the_next_batch_before_training_this_one(main_run):
    _, train, seen = main_run
    assert seen["events"] == ["generate", "generate", "train", "generate", "train", "train"]
    # Step N trains on rollouts from weights N-2 (one step stale) once the pipeline is full.
    assert [line["train/staleness"] for line in train] == [0, 1, 1]
    assert [line["train/rollout/version"] for line in train] == [0.0, 0.0, 1.0]


def test_staleness_beyond_the_algorithm_bound_raises(ray_cluster):  # noqa: F811
    batch = RolloutBatch([[1, 2]] * 2, [[3], [4]], ["a", "b"], [False] * 2, [0, 0], {}, version=0,
                         rewards=[0.0, 1.0])
    ref = ray.put(batch)
    one_rank = BatchPlan(world_size=1, micro_batch_size=2, accumulation=1, eval_batch_size=1, num_generations=2)
    ok = make_step_batch.options(num_returns=2).remote(GRPO(num_generations=2, beta=0.0, max_staleness=1),
                                                       [ref], one_rank, 0, 1, 0)
    assert ray.get(ok[1])["metrics"]["staleness"] == 1
    stale = make_step_batch.options(num_returns=2).remote(GRPO(num_generations=2, beta=0.0, max_staleness=1),
                                                          [ref], one_rank, 0, 2, 0)
    with pytest.raises(RuntimeError, match=r"version 0 are 2 steps behind .* allows 1"):
        ray.get(stale[1])
    args = parse_args(RlhfArguments, ["--model", "m", "--dataset", "d", "--async_generate", "true"])
    assert GRPO.from_args(args).max_staleness == 1


# ------------------------------------------------------------------ dynamic sampling


def group_flat(solutions: list[str]) -> list[bool]:
    return [int(solutions[i]) % 2 == 0 for i in range(0, len(solutions), 4)]


def test_dynamic_sampling_counts_match_the_rewards(ray_cluster, tiny_model_dir, plugin, tmp_path):  # noqa: F811
    calls_file = plugin.with_suffix(".calls.jsonl")
    calls_file.unlink(missing_ok=True)
    _, lines = run(tmp_path, tiny_model_dir, "--dynamic_sample", "true", "--max_resample_times", "2",
                   "--max_steps", "3", "--reward_funcs", "flat_if_even", plugin=plugin)
    calls = [json.loads(x) for x in calls_file.read_text().splitlines()]
    # Replay the rule on what the reward saw: each call is one generation round of 2 prompts x 4.
    expected, i = [], 0
    for _ in range(3):
        kept = dropped = rounds = 0
        while True:
            flat = group_flat(calls[i])
            i, rounds = i + 1, rounds + 1
            kept, dropped = kept + 4 * flat.count(False), dropped + 4 * flat.count(True)
            if kept >= 8 or rounds == 3:  # full, or max_resample_times (2) resamples done
                break
        expected.append((dropped, rounds - 1))
    assert i == len(calls)  # no generation round unaccounted for
    got = [(line["train/dynamic_sample/dropped"], line["train/dynamic_sample/resampled"]) for line in lines]
    assert got == expected
    assert any(resampled for _, resampled in got), "seeded data should need at least one resample"
    # Without --async_generate the rollout engine is synced after every step: rollouts are never stale.
    assert [line["train/rollout/version"] for line in lines] == [0.0, 1.0, 2.0]
    assert [line["train/staleness"] for line in lines] == [0, 0, 0]


def test_fill_dynamic_stops_when_full_and_falls_back_when_exhausted(ray_cluster):  # noqa: F811
    def batch(rewards):
        n = len(rewards)
        return ray.put(RolloutBatch([[1]] * n, [[2]] * n, ["x"] * n, [False] * n, [i // 2 for i in range(n)], {},
                                    version=0, rewards=rewards))

    algo = GRPO(num_generations=2, beta=0.0, dynamic_sample=True)
    flat, half, varied = [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]
    queue = [batch(half), batch(varied)]
    refs, dropped, resampled = rl.fill_dynamic([batch(flat)], algo, 3, 4, lambda attempt: [queue.pop(0)])
    assert (dropped, resampled) == (6, 2) and not queue
    kept = [ray.get(r) for r in refs]
    assert [b.rewards for b in kept] == [[], [0.0, 1.0], [0.0, 1.0, 2.0, 3.0]]

    first = [batch(flat)]
    refs, dropped, resampled = rl.fill_dynamic(first, algo, 1, 4, lambda attempt: [batch(half)])
    assert (refs, dropped, resampled) == (first, 6, 1)  # not enough: train on the step's own rollouts


# ------------------------------------------------------------------ the reference document's GRPO command


# Verbatim from reference/ms-swift-qwen3-best-practice.rst (the shared docs, outside this repository).
REFERENCE_GRPO = r"""
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
NPROC_PER_NODE=8 \
swift rlhf \
    --rlhf_type grpo \
    --model Qwen/Qwen3-8B \
    --train_type full \
    --dataset 'AI-MO/NuminaMath-TIR#5000' \
    --torch_dtype bfloat16 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 2 \
    --learning_rate 1e-6 \
    --save_total_limit 2 \
    --logging_steps 5 \
    --output_dir output \
    --gradient_accumulation_steps 1 \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    --max_completion_length 4096 \
    --vllm_max_model_len 8192 \
    --reward_funcs accuracy \
    --num_generations 16 \
    --use_vllm true \
    --vllm_gpu_memory_utilization 0.4 \
    --sleep_level 1 \
    --offload_model true \
    --offload_optimizer true \
    --gc_collect_after_offload true \
    --deepspeed zero3 \
    --num_infer_workers 8 \
    --tensor_parallel_size 1 \
    --temperature 1.0 \
    --top_p 0.85 \
    --log_completions true \
    --overlong_filter true
"""


def test_reference_command_is_the_documents():
    doc = REPO.parent / "shared" / "reference" / "ms-swift-qwen3-best-practice.rst"
    if not doc.is_file():
        pytest.skip(f"{doc} is not part of this checkout")
    flat = " ".join(doc.read_text().replace("\\\n", " ").split())
    assert " ".join(REFERENCE_GRPO.replace("\\\n", " ").split()) in flat


def test_reference_grpo_command_runs_on_cpu(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    data = tmp_path / "numina.jsonl"  # NuminaMath-TIR's columns: problem, solution (with \boxed{})
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?",
                                        "solution": f"{a} + {b} = {a + b}, so $\\boxed{{{a + b}}}$."}) + "\n"
                            for a in range(1, 5) for b in range(1, 5)))
    words = shlex.split(REFERENCE_GRPO.replace("\\\n", " "))
    env = dict(w.split("=", 1) for w in words[:words.index("swift")])
    argv = words[words.index("swift") + 2:]
    assert words[words.index("swift") + 1] == "rlhf" and env["NPROC_PER_NODE"] == "8"
    # What changes for a CPU box: local model and data, two workers each side, and small counts. With
    # 2 x 2 completions per step (one prompt) the second rollout worker idles: that must work too.
    cut = {"--model": str(tiny_model_dir), "--dataset": f"{data}#16", "--output_dir": str(tmp_path / "out"),
           "--use_vllm": "false", "--num_infer_workers": "2", "--num_generations": "4",
           "--max_completion_length": "16"}
    for flag, value in cut.items():
        argv[argv.index(flag) + 1] = value
    argv[argv.index("--num_train_epochs"):argv.index("--num_train_epochs") + 2] = ["--max_steps", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    args = parse_args(RlhfArguments, argv)
    assert args.deepspeed == "zero3" and args.world_size == 2 and args.torch_dtype == "bfloat16"
    run_dir = rl.run_rlhf(args)
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [1, 2]
    assert all(math.isfinite(line["train/loss"]) for line in train)
    for line in train:  # --overlong_filter: only completions that stopped on their own carry loss tokens
        assert (line["train/num_tokens"] == 0) == (line["train/completions/clipped_ratio"] == 1.0)
    # One iteration per batch is on-policy: the ratio is exactly 1, nothing clips.
    assert all(line["train/clip_ratio/region_mean"] == 0.0 for line in train)
    assert (run_dir / "checkpoint-2").is_dir()
    # The logged reward is the accuracy reward of the logged completions against their rows' solutions.
    from swiftray.rewards import build_reward_funcs

    solution_of = {json.loads(r)["problem"]: json.loads(r)["solution"] for r in data.read_text().splitlines()}
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 and {r["step"] for r in rows} == {1, 2}
    per_func, _ = build_reward_funcs(["accuracy"]).score(
        [r["completion"] for r in rows], {"solution": [solution_of[r["prompt"]] for r in rows]}, {})
    assert [r["accuracy"] for r in rows] == per_func["accuracy"]
    for line in train:
        step_rewards = [r["reward"] for r in rows if r["step"] == line["step"]]
        assert line["train/rewards/accuracy/mean"] == pytest.approx(sum(step_rewards) / len(step_rewards))
