"""Weight sync from the policy to the rollout engine: equal log-probs after a sync, versions, buckets, LoRA.

One policy actor and one hf rollout actor; each test re-runs `setup` on them (cheaper than new
processes). The policy trains one step with a large learning rate, so that a missed sync shows.
"""

from __future__ import annotations

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401

from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor
from swiftray.actors.rollout import RolloutActor
from swiftray.algorithms.sft import SFT
from swiftray.experience import sequences_batch, tokens_to_completion_values
from swiftray.models.generation import SamplingParams

torch.set_num_threads(1)
ATOL = 1e-5


@pytest.fixture(scope="module")
def actors(ray_cluster):  # noqa: F811
    policy = ActorGroup(PolicyActor, 1, num_cpus_per_worker=0.5, name="sync-policy")
    rollout = ActorGroup(RolloutActor, 1, num_cpus_per_worker=0.5, name="sync-rollout")
    yield policy, rollout
    policy.shutdown()
    rollout.shutdown()


def setup(actors, model_dir, train_type: str):
    policy, rollout = actors
    config = {"model_dir": str(model_dir), "torch_dtype": "float32", "train_type": train_type,
              "learning_rate": 5e-2, "lr_scheduler_type": "constant", "total_steps": 10, "lora_dropout": 0.0}
    ray.get(policy.call_all("setup", config)
            + rollout.call_all("setup", {"model_dir": str(model_dir), "engine": "hf", "torch_dtype": "float32"}))
    return policy.actors[0], rollout.actors[0]


def sample(rollout, tokenizer):
    """Two prompts x 2 completions from the engine: the sequences both sides score."""
    prompts = [{"prompt_ids": tokenizer.encode(text), "solution": s} for text, s in (("1 + 1 =", "2"), ("hi", "x"))]
    return ray.get(rollout.generate.remote(prompts, SamplingParams(max_new_tokens=8, n=2), 0))


def policy_lp(policy, batch, pad_id):
    rows = sequences_batch(batch.prompt_ids, batch.completion_ids, pad_id)
    token_lp = ray.get(policy.compute_logprobs.remote(rows))
    return tokens_to_completion_values(token_lp, [len(p) for p in batch.prompt_ids],
                                       [len(c) for c in batch.completion_ids])


def max_gap(policy, rollout, batch, pad_id) -> float:
    a = policy_lp(policy, batch, pad_id)
    b = ray.get(rollout.sequence_logprobs.remote(batch.prompt_ids, batch.completion_ids))
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def train_one_step(policy, batch, pad_id):
    rows = sequences_batch(batch.prompt_ids, batch.completion_ids, pad_id)
    return ray.get(policy.train_step.remote([rows], SFT().loss))


def sync(policy, rollout, version: int, bucket_bytes: int = 64 << 20) -> tuple[int, int]:
    """(buckets, tensors loaded)."""
    buckets = ray.get(policy.export_weights.remote(bucket_bytes))
    return len(buckets), ray.get(rollout.update_weights.remote(version, buckets))


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_rollout_logprobs_equal_the_policy_after_sync(actors, tiny_model_dir, tiny_tokenizer, train_type):
    policy, rollout = setup(actors, tiny_model_dir, train_type)
    pad = tiny_tokenizer.pad_token_id
    batch = sample(rollout, tiny_tokenizer)
    assert batch.version == 0 and len(batch) == 4
    assert max_gap(policy, rollout, batch, pad) < ATOL  # both start from the same files

    train_one_step(policy, batch, pad)
    assert max_gap(policy, rollout, batch, pad) > 1e-3  # the rollout engine still has the old weights

    # LoRA: export merges the adapter into base-model names, which the plain hf engine loads.
    n_buckets, n_loaded = sync(policy, rollout, version=1)
    assert n_buckets == 1 and n_loaded > 0
    assert max_gap(policy, rollout, batch, pad) < ATOL
    assert ray.get(rollout.get_version.remote()) == 1
    assert sample(rollout, tiny_tokenizer).version == 1  # every rollout records the weights that made it


def test_versions_increase_and_tiny_buckets_give_the_same_weights(actors, tiny_model_dir, tiny_tokenizer):
    policy, rollout = setup(actors, tiny_model_dir, "full")
    pad = tiny_tokenizer.pad_token_id
    batch = sample(rollout, tiny_tokenizer)
    versions = []
    for version in (1, 2):
        train_one_step(policy, batch, pad)
        whole = ray.get(ray.get(policy.export_weights.remote(64 << 20))[0])
        tiny_refs = ray.get(policy.export_weights.remote(1))  # 1 byte: every tensor starts a new bucket
        tiny = [ray.get(ref) for ref in tiny_refs]
        assert len(tiny) == len(whole) > 10 and all(len(b) == 1 for b in tiny)
        merged = {k: v for b in tiny for k, v in b.items()}
        assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in whole)

        loaded = ray.get(rollout.update_weights.remote(version, tiny_refs))
        assert loaded == len(whole)
        assert max_gap(policy, rollout, batch, pad) < ATOL
        versions.append(sample(rollout, tiny_tokenizer).version)
    assert versions == [1, 2]


def test_sync_rejects_tensors_the_engine_lacks(actors, tiny_model_dir):
    _, rollout = setup(actors, tiny_model_dir, "full")
    bad = ray.put({"model.layers.99.mlp.up_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout model lacks"):
        ray.get(rollout.update_weights.remote(5, [bad]))
    assert ray.get(rollout.get_version.remote()) == 0  # a failed sync does not claim the new version
