"""Weight sync through the policy's shared-memory buffer: exact tensors, no file left behind, a
reader that sees each new write, and policy -> rollout equality through Ray actors."""

from __future__ import annotations

import glob

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401

from swiftray.actors import shared_weights
from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor
from swiftray.actors.rollout import RolloutActor
from swiftray.algorithms.sft import SFT
from swiftray.experience import sequences_batch, tokens_to_completion_values
from swiftray.models.generation import SamplingParams

pytestmark = pytest.mark.skipif(not shared_weights.available(), reason="needs /dev/shm and /proc")
torch.set_num_threads(1)


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.randint(0, 9, (2, 2), generator=g), "empty": torch.zeros(0, 4)}


def test_reader_gets_the_exact_tensors_and_each_new_write():
    before = set(glob.glob("/dev/shm/swiftray-weights-*"))
    writer, reader = shared_weights.SharedWeightsWriter(), shared_weights.SharedWeightsReader()
    for seed in (0, 1):  # the second write reuses the buffer the reader already mapped
        handle = writer.write(state(seed))
        got = reader.read(handle)
        assert got.keys() == state(seed).keys()
        for name, tensor in state(seed).items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    assert reader.path == handle["shared_weights"]
    assert set(glob.glob("/dev/shm/swiftray-weights-*")) == before  # unlinked as soon as it was opened

    bigger = {**state(2), "d": torch.ones(100)}  # a new layout gets a new buffer
    handle = writer.write(bigger)
    assert torch.equal(reader.read(handle)["d"], torch.ones(100))
    writer.close()


def test_a_reader_that_cannot_see_the_buffer_says_so():
    with pytest.raises(RuntimeError, match="not visible from this process"):
        shared_weights.SharedWeightsReader().read({"shared_weights": "/proc/999999999/fd/3", "layout": [],
                                                   "size": 8})


def test_policy_to_rollout_through_shared_memory(ray_cluster, tiny_model_dir, tiny_tokenizer):  # noqa: F811
    policy = ActorGroup(PolicyActor, 1, num_cpus_per_worker=0.5, name="shm-policy")
    rollout = ActorGroup(RolloutActor, 1, num_cpus_per_worker=0.5, name="shm-rollout")
    try:
        config = {"model_dir": str(tiny_model_dir), "learning_rate": 5e-2, "lr_scheduler_type": "constant",
                  "total_steps": 10}
        ray.get(policy.call_all("setup", config) + rollout.call_all("setup", {"model_dir": str(tiny_model_dir)}))
        p, r = policy.actors[0], rollout.actors[0]
        prompts = [{"prompt_ids": tiny_tokenizer.encode(t)} for t in ("1 + 1 =", "hi")]
        batch = ray.get(r.generate.remote(prompts, SamplingParams(max_new_tokens=8, n=2), 0))
        rows = sequences_batch(batch.prompt_ids, batch.completion_ids, tiny_tokenizer.pad_token_id)

        def gap() -> float:
            mine = tokens_to_completion_values(ray.get(p.compute_logprobs.remote(rows)),
                                               [len(x) for x in batch.prompt_ids],
                                               [len(x) for x in batch.completion_ids])
            theirs = ray.get(r.sequence_logprobs.remote(batch.prompt_ids, batch.completion_ids))
            return max(abs(a - b) for ra, rb in zip(mine, theirs) for a, b in zip(ra, rb))

        for version in (1, 2):  # the second sync writes into the buffer the rollout already mapped
            ray.get(p.train_step.remote([rows], SFT().loss))
            assert gap() > 1e-3
            handles = ray.get(p.export_weights.remote(shared_memory=True))
            assert len(handles) == 1 and shared_weights.is_handle(handles[0])
            assert ray.get(r.update_weights.remote(version, handles)) > 10
            assert gap() < 1e-5 and ray.get(r.get_version.remote()) == version
    finally:
        policy.shutdown()
        rollout.shutdown()
