"""Weight sync through the policy's shared-memory buffers: exact tensors, no file left behind, two
buffers used in turn and mapped once, no page faults once made, the hf engine's parameters aliasing the
buffer (and copies where they cannot), and policy -> rollout equality through Ray actors."""

from __future__ import annotations

import glob
import resource

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
from swiftray.models.generation import HFEngine, SamplingParams

pytestmark = pytest.mark.skipif(not shared_weights.available(), reason="needs /dev/shm and /proc")
torch.set_num_threads(1)


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.randint(0, 9, (2, 2), generator=g), "empty": torch.zeros(0, 4)}


def test_reader_gets_the_exact_tensors_and_each_new_write():
    before = set(glob.glob("/dev/shm/swiftray-weights-*"))
    writer, reader = shared_weights.SharedWeightsWriter(), shared_weights.SharedWeightsReader()
    mapped = None
    for seed in range(5):  # syncs 2, 3, 4 write the buffers again, which the reader mapped at sync 0
        handle = writer.write(state(seed))
        assert handle["shared_weights"] == handle["buffers"][seed % 2] and len(set(handle["buffers"])) == 2
        got = reader.read(handle)
        assert got.keys() == state(seed).keys()
        for name, tensor in state(seed).items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
        mapped = mapped or dict(reader.mapped)
        assert reader.mapped.keys() == mapped.keys() and all(reader.mapped[k] is v for k, v in mapped.items())
    assert reader.path == handle["shared_weights"]
    assert set(glob.glob("/dev/shm/swiftray-weights-*")) == before  # unlinked as soon as it was opened

    bigger = {**state(2), "d": torch.ones(100)}  # a new layout gets new buffers
    handle = writer.write(bigger)
    assert torch.equal(reader.read(handle)["d"], torch.ones(100))
    assert len(reader.mapped) == 2  # the old buffers are no longer the reader's to keep
    # Same size, other layout: the fds (so the paths) are reused, and the reader still maps the new buffers.
    renamed = {"x" + k: v + 1 for k, v in bigger.items()}
    handle = writer.write(renamed)
    assert torch.equal(reader.read(handle)["xd"], torch.full((100,), 2.0))
    writer.close()


def test_a_tied_weight_is_written_once():
    tied = torch.randn(64, 16)
    state = {"embed": tied, "empty": torch.zeros(0), "bias": torch.ones(3), "head": tied.detach(),
             "copy": tied.clone()}
    writer, reader = shared_weights.SharedWeightsWriter(), shared_weights.SharedWeightsReader()
    handle = writer.write(state)
    offsets = {name: offset for name, _, _, offset, _ in handle["layout"]}
    assert offsets["embed"] == offsets["head"] != offsets["copy"]
    assert handle["size"] == 4096 + 64 + 4096  # embed (and head), bias padded to 64 bytes, copy
    got = reader.read(handle)
    assert all(torch.equal(got[name], tensor) for name, tensor in state.items())
    writer.close()


def test_too_little_shared_memory_is_a_clear_error(monkeypatch):
    class Small:
        f_bavail, f_frsize = 10, 4096  # 40 KiB free: room for one 24 KiB buffer, not two

    monkeypatch.setattr(shared_weights.os, "statvfs", lambda path: Small)
    with pytest.raises(MemoryError, match="two weight buffers need"):
        shared_weights.SharedWeightsWriter().write({"w": torch.zeros(6144)})


def test_no_page_faults_after_the_buffers_are_made():
    big = {"w": torch.randn(1 << 21), "v": torch.randn(1 << 20).to(torch.bfloat16)}  # 10 MiB, 2560 pages
    writer, reader = shared_weights.SharedWeightsWriter(), shared_weights.SharedWeightsReader()
    reader.read(writer.write(big))  # the first sync makes (writer) and maps (reader) both buffers
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        for t in reader.read(writer.write(big)).values():
            t.sum()  # reads every page
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert faults < 500, faults  # a fault per page would be 3 x 2560 per side
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

        for version in (1, 2, 3, 4):  # syncs 3 and 4 write the buffers again that the rollout computes from
            ray.get(p.train_step.remote([rows], SFT().loss))
            assert gap() > 1e-3
            handles = ray.get(p.export_weights.remote(shared_memory=True))
            assert len(handles) == 1 and shared_weights.is_handle(handles[0])
            assert handles[0]["shared_weights"] == handles[0]["buffers"][(version - 1) % 2]
            assert ray.get(r.update_weights.remote(version, handles)) > 10
            assert gap() < 1e-5 and ray.get(r.get_version.remote()) == version
            in_buffer, params = ray.get(r.__ray_call__.remote(_params_in_buffer))
            assert in_buffer == params  # one copy: the rollout model computes from the buffer itself

        ray.get(p.train_step.remote([rows], SFT().loss))  # the object store still copies, out of the buffer
        ray.get(r.update_weights.remote(5, ray.get(p.export_weights.remote())))
        assert gap() < 1e-5 and ray.get(r.__ray_call__.remote(_params_in_buffer))[0] == 0

        assert ray.get(p.__ray_call__.remote(_full_state_dict_is_the_modules))
    finally:
        policy.shutdown()
        rollout.shutdown()


def _params_in_buffer(actor) -> tuple[int, int]:
    """(the rollout model's tensors that are views of the buffer it read last, all of them)."""
    reader = actor._shared_reader
    buffer = next(b for (path, _), b in reader.mapped.items() if path == reader.path)
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    tensors = actor.engine.model.state_dict().values()
    return sum(start <= t.data_ptr() < end for t in tensors), len(tensors)


def _full_state_dict_is_the_modules(actor) -> bool:
    """DDP on CPU skips get_model_state_dict: same names, the same tensors (neither copies)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    mine = actor.backend.full_state_dict()
    theirs = get_model_state_dict(actor.backend.model, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    return (actor.backend.name == "ddp" and list(mine) == list(theirs)
            and all(mine[k].data_ptr() == theirs[k].data_ptr() and mine[k].dtype == theirs[k].dtype for k in mine))


def load_model(model_dir, seed: int | None = None):
    """The tiny model in float32; with a seed, every weight moved by half its spread (tied ones once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():  # each Parameter once: lm_head and embed_tokens stay tied
                param.add_(0.5 * param.std().nan_to_num() * torch.randn(param.shape, generator=g))
    return model


def buffer_range(reader) -> tuple[int, int]:
    buffer = next(b for (path, _), b in reader.mapped.items() if path == reader.path)
    return buffer.data_ptr(), buffer.data_ptr() + buffer.numel()


def test_hf_engine_computes_from_the_buffer_and_sees_every_sync(tiny_model_dir, tiny_tokenizer):
    engine = HFEngine(load_model(tiny_model_dir), tiny_tokenizer)
    assert engine.static is not None  # the prepacked decoder, which must notice each sync
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    prompts = [tiny_tokenizer.encode(t) for t in ("1 + 1 =", "hi there", "7")]
    sources = [load_model(tiny_model_dir, seed) for seed in (1, 2, 3, 4)]
    want = [[c.token_ids for c in HFEngine(m, tiny_tokenizer).generate(prompts, greedy)] for m in sources]
    assert want[1] != want[3]  # the weights differ enough to change greedy tokens

    writer, reader = shared_weights.SharedWeightsWriter(), shared_weights.SharedWeightsReader()
    for k, source in enumerate(sources):
        engine.load_weights(reader.read(writer.write(source.state_dict())), share=True)
        start, end = buffer_range(reader)
        assert all(start <= t.data_ptr() < end for t in engine.model.state_dict().values())
        if k != 2:  # sync 3 follows sync 2 with no generation between: same buffer, same pointers as sync 1
            assert [c.token_ids for c in engine.generate(prompts, greedy)] == want[k], k
    mine = engine.completion_logprobs(prompts, want[3])
    theirs = HFEngine(sources[3], tiny_tokenizer).completion_logprobs(prompts, want[3])
    torch.testing.assert_close(torch.tensor(sum(mine, [])), torch.tensor(sum(theirs, [])), rtol=0, atol=1e-5)
    writer.close()


def test_hf_engine_copies_what_it_cannot_share(tiny_model_dir, tiny_tokenizer):
    engine = HFEngine(load_model(tiny_model_dir), tiny_tokenizer)
    own = {k: v.data_ptr() for k, v in engine.model.state_dict().items()}
    writer, reader = shared_weights.SharedWeightsWriter(), shared_weights.SharedWeightsReader()

    half = {k: v.to(torch.bfloat16) for k, v in load_model(tiny_model_dir, 1).state_dict().items()}
    engine.load_weights(reader.read(writer.write(half)), share=True)  # bfloat16 into float32: copied
    state = engine.model.state_dict()
    assert all(state[k].data_ptr() == own[k] and state[k].dtype == torch.float32 for k in state)
    assert all(torch.equal(state[k], half[k].float()) for k in half)

    full = load_model(tiny_model_dir, 2).state_dict()
    engine.load_weights(reader.read(writer.write(full)))  # share=False (object-store buckets): copied
    assert all(v.data_ptr() == own[k] and torch.equal(v, full[k]) for k, v in engine.model.state_dict().items())

    engine.load_weights(reader.read(writer.write(full)), share=True)  # shared...
    start, end = buffer_range(reader)
    buffer = next(b for (path, _), b in reader.mapped.items() if path == reader.path)
    before = buffer.clone()
    zeros = {k: torch.zeros_like(v) for k, v in full.items()}
    engine.load_weights(zeros)  # ...then copied: into memory of the engine's own, never into the buffer
    assert torch.equal(buffer, before)
    state = engine.model.state_dict()
    assert all(not start <= v.data_ptr() < end and not v.any() for v in state.values())
    writer.close()
