"""Resuming reads only safetensors and JSON: no checkpoint file can run code, a missing or broken
part is named, and the state is whole per parameter, so a different number of ranks (or another
backend) resumes it with the losses of the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401  (session fixture)
from test_policy_backends import STEPS, TRAIN, CrossEntropyLoss, make_batches, reference_run, split

from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor

torch.set_num_threads(1)
SAVE_AFTER = 3


class CreatesFile:
    """Unpickling this object opens (creates) `path`: the stand-in for code a pickle runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickles(folder, marker) -> list:
    """The pickled files earlier swiftray versions (and DeepSpeed / torch.distributed.checkpoint) wrote."""
    (folder / "train_state").mkdir(parents=True, exist_ok=True)
    paths = [folder / "rank_0.pt", folder / "rank_1.pt", folder / "train_state" / ".metadata",
             folder / "train_state" / "__0_0.distcp", folder / "train_state" / "mp_rank_00_model_states.pt"]
    for path in paths:
        with open(path, "wb") as f:
            if path.name == ".metadata":  # torch.distributed.checkpoint's metadata is a plain pickle
                pickle.dump({"storage_data": CreatesFile(str(marker))}, f)
            else:
                torch.save({"scheduler": CreatesFile(str(marker))}, f)
    return paths


def train(group: ActorGroup, steps: range) -> list[dict]:
    batches, out = make_batches(), []
    for s in steps:
        shards = split(batches[s], group.num_workers)
        results = ray.get(group.call_all_ranked("train_step", [[m] for m in shards], CrossEntropyLoss()))
        out.append(results[0])
    return out


def load_error(group: ActorGroup, path) -> str:
    """load_checkpoint on every rank must fail the same way; its message."""
    messages = []
    for ref in group.call_all("load_checkpoint", str(path)):
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(ref)
        messages.append(str(err.value).strip().splitlines()[-1])
    assert len(set(messages)) == 1
    return messages[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_qwen3_ckpt")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir):
    return reference_run(model_dir, make_batches())


@pytest.fixture(scope="module")
def groups(ray_cluster):  # noqa: F811
    made = {n: ActorGroup(PolicyActor, n, num_cpus_per_worker=1, name=f"ckpt_safety_{n}") for n in (1, 2)}
    yield made
    for group in made.values():
        group.shutdown()


def test_crafted_pickles_never_run(groups, model_dir, tmp_path):
    marker = tmp_path / "code_ran"
    bait = plant_pickles(tmp_path / "bait", tmp_path / "bait_ran")
    torch.load(bait[0], weights_only=False)  # control: loading such a file the old way runs its code
    assert (tmp_path / "bait_ran").exists()
    (tmp_path / "bait_ran").unlink()
    with open(bait[2], "rb") as f:
        pickle.load(f)
    assert (tmp_path / "bait_ran").exists()

    single = groups[1]
    single.get_all("setup", {"model_dir": model_dir, **TRAIN})
    train(single, range(1))
    ckpt = tmp_path / "ckpt"
    single.get_all("save_checkpoint", str(ckpt))
    plant_pickles(ckpt, marker)  # beside a valid training state: ignored
    assert single.get_all("load_checkpoint", str(ckpt)) == [1]

    legacy = tmp_path / "legacy"  # only the old, pickled training state: refused
    plant_pickles(legacy, marker)
    shutil.copy(ckpt / "model.safetensors", legacy)
    message = load_error(single, legacy)
    assert "rank_0.pt" in message and "pickle" in message and "can run code" in message
    assert not marker.exists()


def test_missing_and_broken_parts_are_named(groups, model_dir, tmp_path):
    pair = groups[2]
    pair.get_all("setup", {"model_dir": model_dir, **TRAIN})
    train(pair, range(1))
    good = tmp_path / "good"
    pair.get_all("save_checkpoint", str(good))

    def broken(name: str, change) -> str:
        path = tmp_path / name
        shutil.copytree(good, path)
        change(path / "train_state")
        return load_error(pair, path)

    for part in ("optimizer.safetensors", "trainable.safetensors", "rng_rank_1.safetensors"):
        message = broken(f"no_{part}", lambda d, part=part: (d / part).unlink())
        assert f"no_{part}/train_state/{part}: missing" in message
    message = broken("no_meta", lambda d: (d / "train_state.json").unlink())
    assert "no_meta/train_state/train_state.json: missing" in message

    def truncate(d):
        data = (d / "optimizer.safetensors").read_bytes()
        (d / "optimizer.safetensors").write_bytes(data[: len(data) // 2])

    message = broken("truncated", truncate)
    assert "truncated/train_state/optimizer.safetensors: not a valid safetensors file" in message
    message = broken("garbage_json", lambda d: (d / "train_state.json").write_text("{not json"))
    assert "garbage_json/train_state/train_state.json: not valid JSON" in message

    def drop_a_moment(d):
        from safetensors.torch import load_file, save_file

        state = load_file(str(d / "optimizer.safetensors"))
        save_file({k: v for k, v in state.items() if not k.startswith("lm_head.weight/")},
                  str(d / "optimizer.safetensors"))

    message = broken("partial", drop_a_moment)
    assert "partial/train_state/optimizer.safetensors: lacks 1 trainable parameter(s)" in message
    assert "'lm_head.weight'" in message
    # The good one still loads after all that.
    assert pair.get_all("load_checkpoint", str(good)) == [1, 1]


# (save ranks, save backend, resume ranks, resume backend). ZeRO-3 with persistence threshold 0
# partitions even the tiny model's small tensors, so the path that re-partitions them runs too.
ZERO3_PARTITIONED = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
CASES = {
    "ddp_2_to_1": (2, {"backend": "ddp"}, 1, {"backend": "ddp"}),
    "ddp_1_to_2": (1, {"backend": "ddp"}, 2, {"backend": "ddp"}),
    "zero3_2_to_1": (2, {"backend": "deepspeed", "deepspeed": "zero3"}, 1,
                     {"backend": "deepspeed", "deepspeed": ZERO3_PARTITIONED}),
    "zero3_1_to_2": (1, {"backend": "deepspeed", "deepspeed": "zero3"}, 2,
                     {"backend": "deepspeed", "deepspeed": ZERO3_PARTITIONED}),
    "fsdp2_2_to_1": (2, {"backend": "fsdp2"}, 1, {"backend": "fsdp2"}),
    "zero2_2_to_ddp_1": (2, {"backend": "deepspeed", "deepspeed": "zero2"}, 1, {"backend": "ddp"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_number_of_ranks_gives_the_same_losses(groups, model_dir, reference, tmp_path, case):
    save_ranks, save_backend, load_ranks, load_backend = CASES[case]

    def config(backend: dict) -> dict:
        if isinstance(backend.get("deepspeed"), dict):
            path = tmp_path / "ds.json"
            path.write_text(json.dumps(backend["deepspeed"]))
            backend = {**backend, "deepspeed": str(path)}
        return {"model_dir": model_dir, **TRAIN, **backend}

    saver, loader = groups[save_ranks], groups[load_ranks]
    saver.get_all("setup", config(save_backend))
    first = train(saver, range(SAVE_AFTER))
    saver.get_all("save_checkpoint", str(tmp_path / "ckpt"))
    loader.get_all("setup", config(load_backend))
    assert loader.get_all("load_checkpoint", str(tmp_path / "ckpt")) == [SAVE_AFTER] * load_ranks
    resumed = train(loader, range(SAVE_AFTER, STEPS))

    metrics = first + resumed
    torch.testing.assert_close([m["loss"] for m in metrics], reference["loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close([m["grad_norm"] for m in metrics], reference["grad_norm"], rtol=1e-4, atol=0)
    warmup = math.ceil(TRAIN["warmup_ratio"] * STEPS)
    expected_lr = [TRAIN["learning_rate"] * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (STEPS - warmup)))
                   for s in range(SAVE_AFTER, STEPS)]
    assert [m["lr"] for m in resumed] == pytest.approx(expected_lr, rel=1e-12)
