"""The fault machinery's parts without a cluster: the ledger's checks, the weight broadcast's wire format,
the per-engine transport rule, and a reward function cut off by --reward_timeout (in a child process)."""

from __future__ import annotations

import json
import socket
import threading

import torch

from swiftray.actors.collective_sync import WeightBroadcast
from swiftray.actors.configs import RewardConfig
from swiftray.actors.reward import RewardActor
from swiftray.controller import ledger
from swiftray.experience import RolloutBatch
from swiftray.plan import ClusterPlan


def write_ledger(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def line(step, prompts, replay=0, resample=0):
    return {"step": step, "policy_version": step - 1, "prompts": prompts, "replay": replay, "faults": [],
            "chunks": [{"chunk": 0, "prompts": prompts, "resample": resample}]}


def test_ledger_check_finds_missing_steps_lost_extra_and_doubled_prompts(tmp_path):
    path = tmp_path / ledger.LEDGER
    expected = {1: [1, 2, 3], 2: [4, 5, 6], 3: [7, 8, 9]}
    write_ledger(path, [line(1, [1, 2, 3]), line(2, [4, 5, 6])])
    assert ledger.check(path, expected, last_step=2) == []
    assert ledger.check(path, expected, last_step=3) == ["step 3: not in the ledger"]
    write_ledger(path, [line(1, [1, 2, 2]), line(2, [4, 5, 6, 9])])
    problems = ledger.check(path, expected)
    assert "step 1: prompts [2] used more than once" in problems
    assert "step 1: prompts lost [3], prompts extra [2]" in problems
    assert "step 2: prompts lost [], prompts extra [9]" in problems


def test_a_replayed_step_stands_in_for_the_first_try(tmp_path):
    path = tmp_path / ledger.LEDGER
    book = ledger.Ledger(tmp_path)
    book.add(1, [{"prompts": [1, 2]}])
    book.close(1, 0)
    book.add(2, [{"prompts": [3, 4]}])
    book.close(2, 1)
    book.add(3, [{"prompts": [9]}])  # collected, never trained: void after the rewind
    book.rewind(1)  # the policy went back to step 1: step 2 is done again
    assert 3 not in book.pending
    book.add(2, [{"prompts": [3, 4]}])
    assert book.close(2, 1)["replay"] == 1
    steps = ledger.standing(path)
    assert steps[2]["replay"] == 1 and steps[2]["prompts"] == [3, 4]
    assert ledger.check(path, {1: [1, 2], 2: [3, 4]}) == []


def test_each_engine_gets_the_transport_the_plan_rule_gives():
    auto = ClusterPlan(weight_sync="auto")
    assert auto.transport(True, "hf") == "shared_memory"
    assert auto.transport(False, "hf") == "collective"
    assert auto.transport(True, "vllm") == "collective"  # vLLM does not alias a shared buffer
    assert ClusterPlan(weight_sync="shared_memory").transport(False) == "object_store"
    assert ClusterPlan(weight_sync="object_store").transport(True) == "object_store"
    assert ClusterPlan(weight_sync="collective").transport(True) == "collective"


def test_broadcast_sends_every_tensor_whole_in_buckets_with_its_version():
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(64, 32), "b.bias": torch.randn(7).to(torch.bfloat16),
             "c.ids": torch.arange(10), "d.empty": torch.zeros(0), "e.big": torch.randn(300, 10)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got: dict = {}

    def member(rank: int) -> None:
        group = WeightBroadcast("127.0.0.1", port, rank, 3, "gloo", epoch=1)
        if rank == 0:
            got["sent"] = group.send(state, version=7, bucket_bytes=4096)  # several buckets
        else:
            got[rank] = group.receive()

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got["sent"] == sum(t.numel() * t.element_size() for t in state.values())
    for rank in (1, 2):
        version, received = got[rank]
        assert version == 7 and list(received) == list(state)
        for name, tensor in state.items():
            assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name


HANGING_PLUGIN = '''
import time

from swiftray.rewards import register_reward


@register_reward("hangs_on_x")
def hangs_on_x(completions, **kwargs):
    """1.0 per completion, but hangs on a completion that is exactly "x"."""
    out = []
    for c in completions:
        if c == "x":
            time.sleep(3600)
        out.append(1.0)
    return out
'''


def test_a_reward_function_that_hangs_is_cut_off_sample_by_sample(tmp_path):
    plugin = tmp_path / "hanging_reward.py"
    plugin.write_text(HANGING_PLUGIN)
    actor = RewardActor()
    actor.setup(RewardConfig(reward_funcs=("hangs_on_x", "format"), external_plugins=(str(plugin),),
                             timeout_s=1.0))
    completions = ["a", "x", "b", "x"]
    batch = RolloutBatch([[1]] * 4, [[2]] * 4, completions, [False] * 4, [0, 0, 1, 1], {}, 0)
    out = actor.annotate(batch)
    assert out.reward_per_func["hangs_on_x"] == [1.0, None, 1.0, None]
    assert len(out.reward_per_func["format"]) == 4  # the other function scored every sample
    assert actor.receipt_notes() == {"reward_timeouts": [["hangs_on_x", 1, 0], ["hangs_on_x", 3, 1]]}
    # The child was ended and started again: the next batch is scored as usual.
    again = actor.annotate(RolloutBatch([[1]], [[2]], ["y"], [False], [0], {}, 0))
    assert again.reward_per_func["hangs_on_x"] == [1.0] and actor.receipt_notes()["reward_timeouts"] == []
    actor.process.stop()
