"""Non-finite values never reach the weights.

- A reward function that returns NaN or +-inf is refused, naming the function, the sample and the
  value; with the reward setting `nonfinite_reward: missing` the value counts as missing (None) and
  is counted.
- A policy step whose loss (on any rank) or gradient norm is not finite changes nothing on any
  rank: the saved training state (weights, AdamW moments, LR schedule) is the same before and after
  it, and the next finite step trains as if it had never happened. `max_nonfinite_steps` such steps
  in a row stop the run with an error naming the step and the value.
"""

from __future__ import annotations

import json
import math

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401  (session fixture)
from safetensors.torch import load_file
from test_policy_backends import TRAIN, CrossEntropyLoss, make_batches, reference_run, split

from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor
from swiftray.rewards import RewardFunctionError, build_reward_funcs, reward_metrics

torch.set_num_threads(1)


# --- rewards ---------------------------------------------------------------------------------
def spiky(completions, **kwargs):
    """1.0, except a completion that says which non-finite value to return."""
    values = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
    return [values.get(c, 1.0) for c in completions]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nonfinite_reward_is_refused_naming_function_sample_and_value(bad):
    rewards = build_reward_funcs([spiky], None, {})
    with pytest.raises(RewardFunctionError) as err:
        rewards.score(["fine", bad, "fine"])
    message = str(err.value)
    assert "reward function 'spiky'" in message and "sample 1" in message
    assert repr(bad) in message and str(float(bad)) in message
    assert "nonfinite_reward" in message


def test_nonfinite_reward_as_missing_is_dropped_and_counted():
    def half(completions, **kwargs):
        return [0.5] * len(completions)

    rewards = build_reward_funcs([spiky, half], [2.0, 1.0], {"nonfinite_reward": "missing"})
    per_func, total = rewards.score(["nan", "ok", "inf", "-inf"])
    assert per_func["spiky"] == [None, 1.0, None, None]
    assert total == [0.5, 2.5, 0.5, 0.5]  # the missing value drops out of the weighted sum
    assert rewards.last_nonfinite == {"spiky": 3}
    metrics = reward_metrics(per_func, total, nonfinite=rewards.last_nonfinite)
    assert metrics["rewards/spiky/nonfinite"] == 3.0 and metrics["rewards/half/nonfinite"] == 0.0
    assert metrics["rewards/spiky/mean"] == 1.0  # over the finite values only
    rewards.score(["ok"])
    assert rewards.last_nonfinite == {}  # counts are per call
    with pytest.raises(ValueError, match="nonfinite_reward='skip'"):
        build_reward_funcs([spiky], None, {"nonfinite_reward": "skip"})


# --- policy steps ------------------------------------------------------------------------------
class PoisonableLoss(CrossEntropyLoss):
    """Cross-entropy, times `poison` (NaN or inf) on micro-batches that carry one."""

    def __call__(self, token_logprobs, batch, num_tokens_global):
        loss, metrics = super().__call__(token_logprobs, batch, num_tokens_global)
        if "poison" in batch:
            loss = loss * batch["poison"][0]
        return loss, metrics


def step(group: ActorGroup, batch: dict, poison_rank: int | None = None, poison: float = math.nan) -> dict:
    """One training step of `batch` split over the ranks; rank `poison_rank`'s loss made non-finite."""
    shards = split(batch, group.num_workers)
    if poison_rank is not None:
        shard = shards[poison_rank]
        shards[poison_rank] = {**shard, "poison": torch.full((len(shard["input_ids"]),), poison)}
    results = ray.get(group.call_all_ranked("train_step", [[s] for s in shards], PoisonableLoss()))
    assert all(r.keys() == results[0].keys() for r in results)
    assert len({r["skipped_nonfinite"] for r in results}) == 1  # every rank agrees
    return results[0]


def saved_state(path) -> tuple[dict, dict]:
    """All tensors of a checkpoint (weights + training state) and its train_state.json."""
    tensors = {}
    for name in ("model.safetensors", "train_state/trainable.safetensors", "train_state/optimizer.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in load_file(str(path / name)).items()})
    meta = json.loads((path / "train_state" / "train_state.json").read_text())
    return tensors, meta


@pytest.fixture(scope="module")
def pair(ray_cluster):  # noqa: F811
    group = ActorGroup(PolicyActor, 2, num_cpus_per_worker=1, name="nonfinite_pair")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_qwen3_nonfinite")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir):
    return reference_run(model_dir, make_batches())


BACKENDS = {"ddp": {"backend": "ddp"}, "fsdp2": {"backend": "fsdp2"},
            "zero2": {"backend": "deepspeed", "deepspeed": "zero2"},
            "zero3": {"backend": "deepspeed", "deepspeed": "zero3"}}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_nonfinite_step_changes_nothing_and_the_next_step_trains(pair, model_dir, reference, tmp_path, name):
    pair.get_all("setup", {"model_dir": model_dir, **TRAIN, **BACKENDS[name]})
    batches = make_batches()
    first = [step(pair, batches[0]), step(pair, batches[1])]
    pair.get_all("save_checkpoint", str(tmp_path / "before"))
    # Only rank 1's loss is bad: rank 0 must skip too (NaN on the first backend, inf on the next).
    bad = step(pair, batches[2], poison_rank=1, poison=math.nan if name in ("ddp", "zero2") else math.inf)
    assert bad["skipped_nonfinite"] == 1.0 and not math.isfinite(bad["loss"])
    assert not math.isfinite(bad["grad_norm"])
    pair.get_all("save_checkpoint", str(tmp_path / "after"))

    before, meta_before = saved_state(tmp_path / "before")
    after, meta_after = saved_state(tmp_path / "after")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert meta_after.pop("nonfinite_in_row") == 1 and meta_after.pop("nonfinite_total") == 1
    assert meta_before.pop("nonfinite_in_row") == 0 and meta_before.pop("nonfinite_total") == 0
    assert meta_before == meta_after  # step count, LR schedule, optimizer groups
    assert meta_after["global_step"] == 2

    # The next finite steps train as the uninterrupted 1-process loop does (LR included).
    rest = [step(pair, batches[2]), step(pair, batches[3])]
    metrics = first + rest
    assert [m["skipped_nonfinite"] for m in metrics] == [0.0] * 4
    torch.testing.assert_close([m["loss"] for m in metrics], reference["loss"][:4], rtol=1e-4, atol=0)
    assert bad["lr"] == rest[0]["lr"] and rest[1]["lr"] < rest[0]["lr"]


def test_max_nonfinite_steps_in_a_row_stop_with_the_step_and_value(pair, model_dir):
    pair.get_all("setup", {"model_dir": model_dir, **TRAIN, "max_nonfinite_steps": 2})
    batches = make_batches()
    assert step(pair, batches[0], poison_rank=0)["skipped_nonfinite"] == 1.0
    assert step(pair, batches[0])["skipped_nonfinite"] == 0.0  # a finite step resets the count
    assert step(pair, batches[1], poison_rank=1)["skipped_nonfinite"] == 1.0
    shards = split(batches[1], 2)
    shards[0] = {**shards[0], "poison": torch.full((len(shards[0]["input_ids"]),), math.inf)}
    for ref in pair.call_all_ranked("train_step", [[s] for s in shards], PoisonableLoss()):
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(ref)
        message = str(err.value)
        assert "optimizer step 2: loss=inf" in message and "2 step(s) in a row" in message
        assert "max_nonfinite_steps=2" in message
