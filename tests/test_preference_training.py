"""Preference training's pieces: pair batches per rank, the reference's row log-probs, DPO on 1 rank vs two-rank
DDP and ZeRO-3 (the same losses), the reward-model head in the policy actor, and the reward-model role of GRPO.

The multi-rank runs follow test_policy_backends.py: PolicyActor groups on the session's Ray cluster, the same
global batches cut for 1 or 2 ranks by the real batcher; expected values are float64 re-statements computed
here from the Hugging Face model.
"""

from __future__ import annotations

import math

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401  (session fixture)

from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor
from swiftray.actors.reference import ReferenceActor
from swiftray.algorithms.dpo import DPO
from swiftray.data.builtin.arithmetic_pairs import arithmetic_pairs_split
from swiftray.data.kinds import dataset_kind
from swiftray.data.packing import IGNORE_INDEX
from swiftray.data.preference import encode_pair, normalize_pair_row
from swiftray.data.template import Template
from swiftray.plan import BatchPlan

torch.set_num_threads(1)
STEPS, PAIRS = 3, 4  # pairs per optimizer step
TRAIN = dict(learning_rate=1e-3, weight_decay=0.0, total_steps=STEPS, max_grad_norm=1.0, lr_scheduler_type="constant",
             seed=7)


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer) -> list[dict]:
    """Encoded arithmetic pairs (prompt, chosen and rejected ids and labels)."""
    template = Template(tiny_tokenizer)
    rows = arithmetic_pairs_split("easy_train")[: STEPS * PAIRS]
    return [encode_pair(template, normalize_pair_row(row)) for row in rows]


def step_shards(samples: list[dict], world: int, micro: int, accumulation: int, pad: int) -> list[list[list[dict]]]:
    """The batcher's shards[step][rank] for STEPS steps of PAIRS pairs, in dataset order."""
    batch = BatchPlan(world_size=world, micro_batch_size=micro, accumulation=accumulation, eval_batch_size=1)
    assert batch.samples_per_optimizer_step == PAIRS
    batcher = dataset_kind("pairs").batcher(samples, batch, pad_token_id=pad, seed=0, shuffle=False, packing=False,
                                            max_length=None, attn_impl=None)
    return [batcher.next_step() for _ in range(STEPS)]


def test_pairs_stay_whole_and_every_micro_batch_carries_the_step_counts(pairs, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    for world, micro, accumulation in ((1, 4, 1), (2, 2, 1), (2, 1, 2)):
        shards = step_shards(pairs, world, micro, accumulation, pad)
        for step, per_rank in enumerate(shards):
            expected = pairs[step * PAIRS:(step + 1) * PAIRS]
            chosen_tokens = sum(sum(x != IGNORE_INDEX for x in p["chosen_labels"]) for p in expected)
            # rank r's k-th micro-batch holds the step's pairs (k * world + r) * micro ...
            seen = []
            for k in range(accumulation):
                for rank in range(world):
                    mb = per_rank[rank][k]
                    assert mb["input_ids"].shape[0] == 2 * micro
                    assert mb["num_pairs_global"].item() == PAIRS
                    assert mb["num_chosen_tokens_global"].item() == chosen_tokens
                    for row in range(0, 2 * micro, 2):  # chosen and rejected: adjacent, one prompt
                        plen = int(mb["prompt_lens"][row])
                        assert torch.equal(mb["input_ids"][row, :plen], mb["input_ids"][row + 1, :plen])
                        n = int(mb["attention_mask"][row].sum())
                        seen.append(mb["input_ids"][row, :n].tolist())
            assert seen == [p["prompt_ids"] + p["chosen_ids"] for p in expected]


def test_a_dataset_smaller_than_a_step_is_cycled_not_filled_with_empty_rows(pairs, tiny_tokenizer):
    batch = BatchPlan(world_size=1, micro_batch_size=5, accumulation=1, eval_batch_size=1)
    batcher = dataset_kind("pairs").batcher(pairs[:2], batch, pad_token_id=tiny_tokenizer.pad_token_id, seed=0,
                                            shuffle=False, packing=False, max_length=None, attn_impl=None)
    ((micro,),) = batcher.next_step()
    assert micro["input_ids"].shape[0] == 10 and micro["num_pairs_global"].item() == 5
    assert (micro["labels"][:, 1:] != IGNORE_INDEX).any(-1).all()  # every row has loss tokens


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> ReferenceActor:
    actor = ReferenceActor()  # the actor class itself, in this process
    actor.setup({"model_dir": str(tiny_model_dir)})
    return actor


def test_reference_row_logps_are_each_rows_labelled_log_probs(pairs, reference, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    shard = step_shards(pairs, 1, 4, 1, tiny_tokenizer.pad_token_id)[0][0]  # step 0, rank 0: [micro-batch]
    (annotated,) = reference.annotate_rows(shard)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row, (pair, side) in enumerate((p, s) for p in pairs[:PAIRS] for s in ("chosen", "rejected")):
        prompt = pair["prompt_ids"] if side == "chosen" else pair["rejected_prompt_ids"]
        seq = torch.tensor([prompt + pair[f"{side}_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].double(), -1)
        want = sum(logp[len(prompt) + t - 1, tok].item() for t, (tok, lab) in
                   enumerate(zip(pair[f"{side}_ids"], pair[f"{side}_labels"])) if lab != IGNORE_INDEX)
        assert annotated["ref_logps"][row].item() == pytest.approx(want, abs=2e-4)


@pytest.fixture(scope="module")
def two_ranks(ray_cluster):  # noqa: F811
    group = ActorGroup(PolicyActor, 2, num_cpus_per_worker=1, name="pref_pair")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def one_rank(ray_cluster):  # noqa: F811
    group = ActorGroup(PolicyActor, 1, num_cpus_per_worker=1, name="pref_single")
    yield group
    group.shutdown()


# sigmoid + IPO (per-token averages, beta 0.1) weighted, plus RPO's NLL: every global count is exercised.
DPO_LOSS = DPO(beta=0.1, loss_type=("sigmoid", "ipo"), loss_weights=(1.0, 0.5), rpo_alpha=0.5)


def train_dpo(group: ActorGroup, shards: list[list[list[dict]]], reference: ReferenceActor, config: dict) -> list:
    group.get_all("setup", config)
    out = []
    for per_rank in shards:
        annotated = [ray.put(reference.annotate_rows(rank_shard)) for rank_shard in per_rank]
        results = ray.get(group.call_all_ranked("train_step", annotated, DPO_LOSS.loss))
        assert all(r == results[0] for r in results)  # every rank reports the global metrics
        out.append(results[0])
    return out


def first_step_loss(pairs: list[dict], model_dir) -> float:
    """DPO_LOSS on the first step's pairs with the policy equal to the reference, in float64: the DPO
    logits are 0, so sigmoid gives log 2 and IPO (0 - 1/(2 beta))^2, plus rpo_alpha x the chosen NLL."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, tokens = 0.0, 0
    for pair in pairs[:PAIRS]:
        seq = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].double(), -1)
        for t, (tok, lab) in enumerate(zip(pair["chosen_ids"], pair["chosen_labels"])):
            if lab != IGNORE_INDEX:
                nll -= logp[len(pair["prompt_ids"]) + t - 1, tok].item()
                tokens += 1
    return math.log(2) + 0.5 * (1 / (2 * 0.1)) ** 2 + 0.5 * nll / tokens


def test_two_rank_ddp_and_zero3_give_one_ranks_dpo_losses(pairs, reference, one_rank, two_ranks, tiny_model_dir,
                                                          tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    config = {"model_dir": str(tiny_model_dir), **TRAIN}
    single = train_dpo(one_rank, step_shards(pairs, 1, 4, 1, pad), reference, config)
    assert single[0]["loss"] == pytest.approx(first_step_loss(pairs, tiny_model_dir), rel=1e-5)
    assert single[-1]["rewards/margins"] > 0  # it trains (on these pairs)
    runs = {"ddp": train_dpo(two_ranks, step_shards(pairs, 2, 2, 1, pad), reference, config),
            "zero3": train_dpo(two_ranks, step_shards(pairs, 2, 1, 2, pad), reference,
                               {**config, "backend": "deepspeed", "deepspeed": "zero3"})}
    for name, metrics in runs.items():
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen"):
            torch.testing.assert_close([m[key] for m in metrics], [m[key] for m in single], rtol=1e-4, atol=1e-6,
                                       msg=lambda text, name=name, key=key: f"{name} {key}: {text}")
        assert [m["rewards/accuracies"] for m in metrics] == [m["rewards/accuracies"] for m in single]


def test_the_score_head_trains_and_saves_a_sequence_classifier(pairs, one_rank, tiny_model_dir, tiny_tokenizer,
                                                               tmp_path):
    from transformers import AutoModelForSequenceClassification

    from swiftray.algorithms.rm import RewardModeling

    pad = tiny_tokenizer.pad_token_id
    one_rank.get_all("setup", {"model_dir": str(tiny_model_dir), "head": "score", **TRAIN})
    algorithm = RewardModeling(center_rewards_coefficient=0.01)
    shards = step_shards(pairs, 1, 4, 1, pad)
    metrics = [ray.get(one_rank.call_all_ranked("train_step", [ray.put(s[0])], algorithm.loss))[0] for s in shards]
    assert metrics[-1]["loss"] < metrics[0]["loss"] and "center_rewards_loss" in metrics[0]
    one_rank.get_all("save_checkpoint", str(tmp_path / "rm"))
    batch = shards[0][0][0]
    scores = ray.get(one_rank.call_rank(0, "compute_logprobs", batch))  # the score head's output, [rows]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        want = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert scores.shape == (2 * PAIRS,)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)


def test_dpo_bco_shift_is_the_running_mean_of_earlier_steps_and_survives_a_checkpoint():
    from swiftray.algorithms.preference_math import RunningMoments

    algo = DPO(loss_type=("bco_pair",))
    assert algo.bco_running.mean == 0.0  # the first step has no earlier steps: shift 0
    means = [0.4, -0.2, 1.0]
    for m in means:
        algo.observe({"rewards/chosen": m + 0.5, "rewards/rejected": m - 0.5})
    assert algo.bco_running.mean == pytest.approx(sum(means) / 3)
    restored = DPO(loss_type=("bco_pair",))
    restored.load_state_dict(algo.state_dict())
    assert restored.bco_running == algo.bco_running
    assert DPO().state_dict() == {} and isinstance(DPO().bco_running, RunningMoments)


def test_kto_reference_point_is_the_mean_over_the_micro_batch_and_clamped():
    from swiftray.algorithms.kto import KTO

    # rows: example, KL row, example, KL row; per-token log-probs put the sums where wanted
    logps = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0], [-0.5, 0.0]])
    ref = torch.tensor([-1.5, -2.5, -2.0, -0.5])
    batch = {"loss_mask": torch.tensor([[True, False]] * 4), "ref_logps": ref, "desirable": torch.tensor([True, False]),
             "num_examples_global": torch.tensor(2)}
    algo = KTO(beta=0.1)
    _, metrics = algo.loss(logps, batch, 0)
    assert metrics["kl"] == pytest.approx(((-2.0 + 2.5) + (-0.5 + 0.5)) / 2)
    _, metrics = algo.loss(logps, {**batch, "ref_logps": ref + 5}, 0)
    assert metrics["kl"] == 0.0  # a negative estimate is clamped at 0
    summary = algo.summarize({**metrics, "loss": 1.0})
    assert summary["rewards/chosen"] == pytest.approx(0.1 * (-1.0 - 3.5))
    assert summary["rewards/margins"] == pytest.approx(summary["rewards/chosen"] - summary["rewards/rejected"])


def test_reward_model_role_adds_its_weighted_score_after_the_functions(tiny_model_dir, tmp_path):
    from swiftray.actors.reward_model import RewardModelActor
    from swiftray.experience import RolloutBatch
    from swiftray.models.reward_model import load_reward_model, reward_scores, save_reward_model

    save_reward_model(load_reward_model(str(tiny_model_dir), seed=3), str(tmp_path / "rm"))
    actor = RewardModelActor()
    actor.setup({"model_dir": str(tmp_path / "rm"), "name": "rm", "weight": 0.5, "batch_size": 2})
    prompts, completions = [[5, 6, 7], [5, 6, 7], [9, 8]], [[10, 11, 1993], [12, 1993], [13]]
    batch = RolloutBatch(prompts, completions, ["a", "b", "c"], [False] * 3, [0, 0, 1], {}, 0,
                         rewards=[1.0, 0.0, 2.0], reward_per_func={"accuracy": [1.0, 0.0, 2.0]})
    out = actor.annotate(batch)
    model = load_reward_model(str(tmp_path / "rm"))
    want = [reward_scores(model, torch.tensor([p + c])).item() for p, c in zip(prompts, completions)]
    assert out.reward_per_func["rm"] == pytest.approx(want, abs=1e-5)
    assert out.rewards == pytest.approx([t + 0.5 * w for t, w in zip([1.0, 0.0, 2.0], want)], abs=1e-5)
    alone = actor.annotate(RolloutBatch(prompts, completions, ["a", "b", "c"], [False] * 3, [0, 0, 1], {}, 0))
    assert alone.rewards == pytest.approx([0.5 * w for w in want], abs=1e-5)  # without reward functions


# ---------------------------------------------------------------- plans


def plan_for(model_dir, *flags: str, gpus: int = 0):
    from swiftray.algorithms import get_algorithm
    from swiftray.arguments import RlhfArguments
    from swiftray.cli_parser import parse_args
    from swiftray.placement import Cluster, Node
    from swiftray.plan import build_plan

    args = parse_args(RlhfArguments, ["--model", str(model_dir), "--dataset", "d.jsonl", *flags])
    return build_plan(args, get_algorithm(args.rlhf_type).from_args(args), Cluster((Node(4, gpus),), "test"), 100,
                      "rlhf")


@pytest.mark.parametrize(("flags", "roles"), [
    (["--rlhf_type", "dpo"], ["policy", "reference"]),
    (["--rlhf_type", "dpo", "--reference_free", "true"], ["policy"]),
    (["--rlhf_type", "kto"], ["policy", "reference"]),
    (["--rlhf_type", "orpo"], ["policy"]),
    (["--rlhf_type", "simpo"], ["policy"]),
    (["--rlhf_type", "cpo"], ["policy"]),
    (["--rlhf_type", "rm"], ["policy"]),
])
def test_each_method_plans_the_roles_it_needs_and_no_rollouts(tiny_model_dir, flags, roles, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    plan = plan_for(tiny_model_dir, *flags)
    assert [r.name for r in plan.roles] == roles and plan.step.mode == "sft"
    assert plan.role("policy").config.head == ("score" if "rm" in flags else "lm")
    if "reference" in roles:
        assert plan.role("reference").phases == ("annotate",)
    # every role fits the machine together (the policy leaves the reference its CPUs)
    assert sum(r.placement.num_cpus * r.placement.num_workers for r in plan.roles) <= 4


def test_ref_adapters_and_ref_model_set_the_reference(tiny_model_dir):
    plan = plan_for(tiny_model_dir, "--rlhf_type", "dpo", "--adapters", "/sft/lora", "--ref_adapters", "/other",
                    "--ref_model", "/ref", "--train_type", "lora")
    ref = plan.role("reference").config
    assert (ref.model_dir, ref.adapters) == ("/ref", ("/other",))
    assert plan_for(tiny_model_dir, "--rlhf_type", "dpo", "--adapters", "/sft/lora", "--train_type",
                    "lora").role("reference").config.adapters == ("/sft/lora",)  # unset: the starting policy


def test_beta_and_loss_type_take_each_methods_default(tiny_model_dir):
    assert plan_for(tiny_model_dir, "--rlhf_type", "simpo").algorithm.beta == 2.0
    assert plan_for(tiny_model_dir, "--rlhf_type", "dpo").algorithm.beta == 0.1
    assert plan_for(tiny_model_dir, "--rlhf_type", "grpo", "--reward_funcs", "format").algorithm.beta == 0.04
    assert plan_for(tiny_model_dir, "--rlhf_type", "dpo").algorithm.loss_type == ("sigmoid",)
    assert plan_for(tiny_model_dir, "--rlhf_type", "cpo").algorithm.loss_type == "sigmoid"
    assert plan_for(tiny_model_dir, "--rlhf_type", "kto").algorithm.loss_type == "kto"
    mpo = plan_for(tiny_model_dir, "--rlhf_type", "dpo", "--loss_type", "sigmoid", "bco_pair", "sft",
                   "--loss_weights", "0.8", "0.2", "1").algorithm
    assert mpo.loss_type == ("sigmoid", "bco_pair", "sft") and mpo.loss_weights == (0.8, 0.2, 1.0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--rlhf_type", "grpo", "--reward_funcs", "format", "--loss_type", "sigmoid"],
     "--loss_type sigmoid: --rlhf_type grpo takes one of grpo, bnpo, dr_grpo, dapo"),
    (["--rlhf_type", "grpo", "--reward_funcs", "format", "--loss_type", "grpo", "bnpo"], "takes one of"),
    (["--rlhf_type", "dpo", "--loss_type", "kto"], "--loss_type kto: DPO takes any of sigmoid"),
    (["--rlhf_type", "dpo", "--loss_type", "sigmoid", "ipo", "--loss_weights", "1"], "--loss_weights has 1 values"),
    (["--rlhf_type", "simpo", "--loss_type", "hinge"], "--rlhf_type simpo takes one of simpo"),
    (["--rlhf_type", "dpo", "--label_smoothing", "0.5"], "--label_smoothing 0.5: expected a number >= 0.0 and < 0.5"),
    (["--rlhf_type", "grpo", "--reward_funcs", "format", "--reward_model", "/nowhere"], "--reward_model /nowhere: no"),
    (["--rlhf_type", "grpo", "--reward_funcs", "format", "--reward_weights", "1"], None),
])
def test_bad_preference_flags_fail_naming_the_flag(tiny_model_dir, flags, message):
    from swiftray.arguments import ArgumentError

    if message is None:  # a consistent GRPO command still plans
        plan_for(tiny_model_dir, *flags)
        return
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_for(tiny_model_dir, *flags)


def test_reward_models_score_after_the_functions_with_their_weights_on_the_gpu(tiny_model_dir):
    from swiftray.arguments import ArgumentError

    flags = ["--rlhf_type", "grpo", "--reward_funcs", "accuracy", "--reward_model", str(tiny_model_dir),
             "--reward_weights", "1", "0.5"]
    gpu = plan_for(tiny_model_dir, *flags, gpus=1)
    assert [r.name for r in gpu.roles_in("score")] == ["reward", "reward_model"]
    rm = gpu.role("reward_model")
    assert rm.config.weight == 0.5 and rm.config.name == tiny_model_dir.name and rm.config.torch_dtype
    assert rm.placement.num_gpus > 0 and all("gpu" in d for d in rm.placement.devices)
    assert gpu.role("reward").config.reward_weights == (1.0,)
    cpu = plan_for(tiny_model_dir, *flags)
    assert cpu.role("reward_model").placement.num_gpus == 0
    alone = plan_for(tiny_model_dir, "--rlhf_type", "grpo", "--reward_model", str(tiny_model_dir))
    assert [r.name for r in alone.roles_in("score")] == ["reward_model"]  # no reward functions: no reward actor
    with pytest.raises(ArgumentError, match="--reward_weights has 1 values but --reward_funcs names 1 functions "
                                            "and --reward_model 1 models"):
        plan_for(tiny_model_dir, *flags[:-3], "--reward_weights", "1")
