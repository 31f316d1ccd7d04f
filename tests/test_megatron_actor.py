"""The Megatron policy actor on CPU over gloo: parallel layouts equal one rank, logits equal HF's,
resume equals an uninterrupted run, and a weight sync makes the rollout engine's log-probs equal.

Starting Megatron ranks costs 15-25 s each here, so the module starts one 1-rank and one 2-rank
group once and re-runs `setup` on them for every layout (setup rebuilds the parallel groups).
"""

from __future__ import annotations

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401

from swiftray.actors.group import ActorGroup
from swiftray.actors.megatron_policy import MegatronPolicyActor, dp_shards
from swiftray.algorithms.sft import SFT
from swiftray.models.tiny import make_tiny_model
from swiftray.models.token_stats import token_entropy, token_logprobs

torch.set_num_threads(1)
STEPS = 3
TRAIN = {"learning_rate": 1e-3, "lr_scheduler_type": "constant", "total_steps": 10, "weight_decay": 0.1,
         "max_grad_norm": 1.0}
MOE = {"moe_aux_loss_coeff": 0.01}  # the auxiliary loss's scaling is part of what must match
TP2_SP = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
# (model, layout) on two ranks; each is compared with the same model on one rank.
LAYOUTS = [
    ("dense", TP2_SP), ("dense", {"pipeline_model_parallel_size": 2}), ("dense", {}),
    ("moe", {"expert_model_parallel_size": 2}), ("moe", TP2_SP), ("moe", {**TP2_SP, "expert_model_parallel_size": 2}),
    ("moe", {"pipeline_model_parallel_size": 2}), ("moe", {}),
]
IDS = [f"{kind}-" + ("-".join(f"{k.split('_')[0]}{v}" for k, v in lay.items()) or "dp2") for kind, lay in LAYOUTS]
RUNS = [("dense", 1, {}), ("moe", 1, {})] + [(kind, 2, lay) for kind, lay in LAYOUTS]
RUN_IDS = ["dense-1rank", "moe-1rank"] + IDS


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    return {"dense": tiny_model_dir, "moe": make_tiny_model(tmp_path_factory.mktemp("tiny_moe"), moe=True)}


@pytest.fixture(scope="module")
def groups(ray_cluster):  # noqa: F811
    one = ActorGroup(MegatronPolicyActor, 1, num_cpus_per_worker=1, name="megatron-one")
    two = ActorGroup(MegatronPolicyActor, 2, num_cpus_per_worker=1, name="megatron-two")
    yield {1: one, 2: two}
    one.shutdown()
    two.shutdown()


def micro_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Four right-padded micro-batches of different widths: the global batch of every step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for width in (16, 12, 14, 10):
        ids = torch.randint(0, 1900, (2, width), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, width - 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def setup(group: ActorGroup, config: dict) -> list:
    """Set the group up; each rank's argument for its data-parallel rank's share of micro_batches()."""
    ray.get(group.call_all("setup", config))
    layout = ray.get(group.call_all("layout"))
    dp = layout[0]["dp_size"]
    batches = micro_batches()
    return dp_shards([batches[r::dp] for r in range(dp)], [rank["dp_rank"] for rank in layout])


class SFTWithEntropy(SFT):
    """SFT's loss, reporting the micro-batch's summed next-token entropy (loss_fn metrics are averaged
    over micro-batches x data-parallel ranks, so every layout reports sum / 4 for micro_batches())."""

    def loss(self, token_logprobs, batch, num_tokens_global):
        loss, _ = super().loss(token_logprobs, batch, num_tokens_global)
        return loss, ({"entropy_sum": float(batch["entropies"].sum())} if "entropies" in batch else {})


def train(group: ActorGroup, per_rank: list, steps: int = STEPS) -> list[tuple[float, float]]:
    """(loss, grad_norm) of each step; the first step's entropy metric is appended to the first pair."""
    metrics = []
    for step in range(steps):
        ranks = ray.get(group.call_all_ranked("train_step", per_rank, SFTWithEntropy().loss, with_entropy=step == 0))
        assert all(r["loss"] == ranks[0]["loss"] and r["grad_norm"] == ranks[0]["grad_norm"] for r in ranks)
        metrics.append((ranks[0]["loss"], ranks[0]["grad_norm"]) + ((ranks[0]["entropy_sum"],) if step == 0 else ()))
    return metrics


def _gathered_logits(self, batch):
    """Runs inside a rank: the full-vocabulary logits of a batch (TP slices gathered), no pipeline."""
    from megatron.core import tensor_parallel

    from swiftray.megatron import cpu_shim
    from swiftray.megatron.batch import model_inputs

    with cpu_shim.device_mode(), torch.no_grad():
        self.ddp.eval()
        inputs = model_inputs(batch)
        logits = self.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                            attention_mask=inputs["attention_mask"])
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits).clone()


@pytest.fixture(scope="module")
def runs(groups, models):
    """Every layout once (and each model on one rank): right after loading, each rank's full logits
    and compute_logprobs on micro_batches()[0]; then STEPS steps' losses and grad norms."""
    probe = micro_batches()[0]
    out = {}
    for kind, ranks, layout in RUNS:
        group = groups[ranks]
        per_rank = setup(group, {"model_dir": str(models[kind]), **TRAIN, **(MOE if kind == "moe" else {}), **layout})
        pipeline = layout.get("pipeline_model_parallel_size", 1) > 1
        logits = None if pipeline else ray.get([a.__ray_call__.remote(_gathered_logits, probe) for a in group.actors])
        logprobs = ray.get(group.call_all("compute_logprobs", probe))
        evaluated = ray.get(group.call_all_ranked("eval_step", per_rank, SFT().loss))
        assert all(e == evaluated[0] for e in evaluated)
        metrics = train(group, per_rank)
        exported = {}  # the trained weights, gathered to rank 0 in HF names, in 256 KiB buckets
        for ref in ray.get(group.call_all("export_weights", 256 << 10))[0]:
            exported.update(ray.get(ref))
        out[kind, ranks, str(layout)] = {"logits": logits, "logprobs": logprobs, "metrics": metrics,
                                         "exported": exported, "eval": evaluated[0]}
    return out


@pytest.mark.parametrize("kind,layout", LAYOUTS, ids=IDS)
def test_two_ranks_match_one_rank(runs, kind, layout):
    reference = runs[kind, 1, "{}"]["metrics"]
    assert reference[-1][0] < reference[0][0] - 0.5  # it learns: an equal loss is not a frozen model
    got = runs[kind, 2, str(layout)]["metrics"]
    for (loss, norm, *_), (ref_loss, ref_norm, *_) in zip(got, reference):
        assert abs(loss - ref_loss) < 1e-5 and abs(norm - ref_norm) < 1e-5 * ref_norm, (got, reference)
    assert abs(got[0][2] - reference[0][2]) < 1e-4  # entropies: vocab-parallel reductions included
    # eval_step on the same batches before any update: the first step's loss, no gradient, no step.
    evaluated = runs[kind, 2, str(layout)]["eval"]
    assert abs(evaluated["loss"] - reference[0][0]) < 1e-5 and evaluated["num_tokens"] > 0
    # The export gathers every TP/PP/EP slice: the same HF tensors as one rank's, after the same steps.
    # (1e-4: Adam's m / (sqrt(v) + eps) turns 1e-7 gradient noise into ~1e-5 where gradients are ~eps;
    # a misplaced slice would be off by the weights' scale, 1e-2, or three updates, 3e-3.)
    mine, theirs = runs[kind, 2, str(layout)]["exported"], runs[kind, 1, "{}"]["exported"]
    assert mine.keys() == theirs.keys()
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < 1e-4


@pytest.mark.parametrize("kind,ranks,layout", RUNS, ids=RUN_IDS)
def test_logits_and_logprobs_equal_hf(runs, models, kind, ranks, layout):
    from transformers import AutoModelForCausalLM

    run = runs[kind, ranks, str(layout)]
    batch = micro_batches()[0]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(models[kind])(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = batch["attention_mask"].bool()
    for logits in run["logits"] or []:  # pipeline stages hold no full model: log-probs only
        assert logits.shape == expected.shape and (logits - expected)[valid].abs().max() < 1e-4
    # The vocab-parallel log-softmax gives the same log-probs as a plain one, on every rank.
    for logprobs in run["logprobs"]:
        assert (logprobs - token_logprobs(expected, batch["labels"])[0]).abs().max() < 1e-4
    if ranks == 1:  # the first step's entropies (before any update) are HF's too
        hf = AutoModelForCausalLM.from_pretrained(models[kind])
        entropy = 0.0
        for b in micro_batches():
            with torch.no_grad():
                logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            entropy += float(token_entropy(logits, b["labels"][:, 1:] != -100).sum())
        assert abs(run["metrics"][0][2] - entropy / 4) < 1e-4


def test_resume_after_save_gives_the_same_losses(groups, models, tmp_path):
    two = groups[2]
    config = {"model_dir": str(models["moe"]), **TRAIN, **MOE, "expert_model_parallel_size": 2}
    per_rank = setup(two, config)
    train(two, per_rank, steps=2)
    ray.get(two.call_all("save_checkpoint", str(tmp_path / "ckpt")))
    uninterrupted = train(two, per_rank, steps=2)

    per_rank = setup(two, config)
    assert ray.get(two.call_all("load_checkpoint", str(tmp_path / "ckpt"))) == [2, 2]
    assert train(two, per_rank, steps=2) == uninterrupted

    # A weights-only save is a model to start from, not a state to resume.
    ray.get(two.call_all("save_checkpoint", str(tmp_path / "weights"), True))
    with pytest.raises(ray.exceptions.RayTaskError, match="no training state"):
        ray.get(two.call_all("load_checkpoint", str(tmp_path / "weights")))


def test_rollout_logprobs_equal_the_megatron_policy_after_sync(groups, models):
    from swiftray.actors.rollout import RolloutActor
    from swiftray.experience import sequences_batch, tokens_to_completion_values
    from swiftray.models.generation import SamplingParams

    two = groups[2]
    model_dir = str(models["moe"])
    rollout = ActorGroup(RolloutActor, 1, num_cpus_per_worker=0.5, name="megatron-sync-rollout")
    try:
        ray.get(rollout.call_all("setup", {"model_dir": model_dir, "engine": "hf", "torch_dtype": "float32"})
                + two.call_all("setup", {"model_dir": model_dir, "expert_model_parallel_size": 2,
                                         "learning_rate": 5e-2, "lr_scheduler_type": "constant", "total_steps": 10}))
        engine = rollout.actors[0]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        prompts = [{"prompt_ids": tok.encode(t), "solution": s} for t, s in (("1 + 1 =", "2"), ("hi", "x"))]
        batch = ray.get(engine.generate.remote(prompts, SamplingParams(max_new_tokens=8, n=2), 0))
        rows = sequences_batch(batch.prompt_ids, batch.completion_ids, tok.pad_token_id)

        def gap() -> float:
            token_lp = ray.get(two.call_all("compute_logprobs", rows))
            assert torch.equal(token_lp[0], token_lp[1])  # every rank of the group answers
            ours = tokens_to_completion_values(token_lp[0], [len(p) for p in batch.prompt_ids],
                                               [len(c) for c in batch.completion_ids])
            theirs = ray.get(engine.sequence_logprobs.remote(batch.prompt_ids, batch.completion_ids))
            return max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a, b))

        assert gap() < 1e-5  # the same files
        ray.get(two.call_all("train_step", [rows], SFT().loss))
        assert gap() > 1e-3  # the engine still has the old weights
        exports = two.call_all("export_weights", 64 << 10)  # small buckets: several of them
        assert ray.get(exports[1]) == []
        loaded = ray.get(engine.update_weights.remote(1, exports[0]))
        assert len(ray.get(exports[0])) > 1 and loaded > 0
        assert gap() < 1e-5
    finally:
        rollout.shutdown()
