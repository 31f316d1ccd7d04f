"""The fault machinery's parts without a cluster: the ledger's checks, the weight broadcast's wire format,
the per-engine transport rule, a reward function cut off by --reward_timeout (in a child process), and
the supervisor's choice when a lost actor finds no room."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch

from swiftray.actors.collective_sync import WeightBroadcast
from swiftray.actors.configs import RewardConfig
from swiftray.actors.reward import RewardActor
from swiftray.controller import ledger, supervision
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


class FakeActor:
    def __init__(self, name):
        self.name = name
        self._actor_id = name


class FakeGroup:
    def __init__(self, *names):
        self.actors = [FakeActor(n) for n in names]


def supervisor_without_room_until(monkeypatch, engines, min_engines, free_after_kills):
    """A Supervisor whose cluster has room for a new actor only after `free_after_kills` kills."""
    killed = []
    monkeypatch.setattr(supervision.ray, "kill", lambda actor: killed.append(actor.name))
    sup = supervision.Supervisor.__new__(supervision.Supervisor)
    sup.roles = {"rollout": FakeGroup(*engines), "reference": FakeGroup("ref0")}
    sup.min_engines, sup.max_restarts = min_engines, 5
    sup.losses, sup.events, sup.engine_nodes, sup.changed = supervision.Counter(), [], {}, False
    timeouts = []

    def start(role, rank, strategy=None, timeout_s=supervision.START_TIMEOUT_S):
        timeouts.append(timeout_s)
        if len(killed) < free_after_kills:
            raise RuntimeError(f"role {role!r}: no room for a new actor")
        return FakeActor(f"new-{role}")

    sup._start = start
    return sup, killed, timeouts


def test_an_engine_above_the_minimum_yields_its_place_to_a_lost_reference(monkeypatch):
    # The dead reference is killed (1), finds no room, then the last engine is stopped (2) and it starts.
    sup, killed, timeouts = supervisor_without_room_until(monkeypatch, ["e0", "e1", "e2"], 2, free_after_kills=2)
    sup.lost("reference", sup.roles["reference"].actors[0], RuntimeError("died"))
    assert killed == ["ref0", "e2"]
    assert [a.name for a in sup.roles["rollout"].actors] == ["e0", "e1"]
    assert sup.roles["reference"].actors[0].name == "new-reference"
    assert [(e["kind"], e["role"]) for e in sup.events] == [("engine_dropped", "rollout"),
                                                           ("actor_replaced", "reference")]
    assert timeouts == [supervision.YIELD_AFTER_S, supervision.START_TIMEOUT_S] and sup.changed


def test_an_engine_pool_at_its_minimum_never_yields(monkeypatch):
    sup, killed, timeouts = supervisor_without_room_until(monkeypatch, ["e0", "e1"], 2, free_after_kills=2)
    with pytest.raises(RuntimeError, match="no room"):
        sup.lost("reference", sup.roles["reference"].actors[0], RuntimeError("died"))
    assert killed == ["ref0"] and len(sup.roles["rollout"].actors) == 2
    assert timeouts == [supervision.START_TIMEOUT_S]  # the full wait: nothing could make room


def test_engines_of_a_node_that_left_are_handed_over_before_a_sync(monkeypatch):
    # e1 and e2 lived on n2, which left without any of their calls failing: a broadcast would wait for them.
    sup, killed, _ = supervisor_without_room_until(monkeypatch, ["e0", "e1", "e2"], 1, free_after_kills=0)
    sup.engine_nodes = {"e0": "n1", "e1": "n2", "e2": "n2"}
    monkeypatch.setattr(supervision, "alive_nodes", lambda: {"n1"})
    sup.check_engine_nodes()
    assert [a.name for a in sup.roles["rollout"].actors] == ["e0"] and killed == ["e1", "e2"]
    assert [e["kind"] for e in sup.events] == ["engine_dropped", "engine_dropped"] and sup.changed
    sup.check_engine_nodes()  # nothing more to hand over
    assert killed == ["e1", "e2"]
