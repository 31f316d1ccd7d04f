"""ActorGroup: placement, ranks, the gloo process group, call helpers, and the timeout error."""

from __future__ import annotations

import pytest
import ray
import torch
import torch.distributed as dist
from _ray import ray_cluster  # noqa: F401  (session fixture)

from swiftray.actors.group import ActorGroup, DistributedWorker


class SumWorker(DistributedWorker):
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def all_reduce(self, value: float) -> float:
        tensor = torch.tensor([value + self.offset], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def echo(self, *args, **kwargs):
        return self.rank, args, kwargs


@pytest.fixture(scope="module")
def group(ray_cluster):  # noqa: F811
    group = ActorGroup(SumWorker, 2, num_cpus_per_worker=1.5, name="summers", init_args=(10,))
    yield group
    group.shutdown()


def test_ranks_and_threads(group):
    pings = group.get_all("ping")
    assert [p["rank"] for p in pings] == [0, 1]
    assert all(p["world_size"] == 2 for p in pings)
    assert pings[0]["pid"] != pings[1]["pid"]
    assert all(p["num_threads"] == 1 for p in pings)  # max(1, int(1.5))


def test_process_group_all_reduce_and_ranked_args(group):
    # rank r contributes per_rank[r] + offset(10): 1 + 10 + 2 + 10 = 23 on every rank
    assert ray.get(group.call_all_ranked("all_reduce", [1.0, 2.0])) == [23.0, 23.0]
    with pytest.raises(ValueError, match="3 per-rank args for 2 ranks"):
        group.call_all_ranked("all_reduce", [1.0, 2.0, 3.0])


def test_call_rank_and_call_all_pass_args(group):
    assert ray.get(group.call_rank(1, "echo", 5, key="v")) == (1, (5,), {"key": "v"})
    assert ray.get(group.call_all("echo", "x")) == [(0, ("x",), {}), (1, ("x",), {})]


def test_placement_timeout_names_role_and_resources(ray_cluster):  # noqa: F811
    before = ray.available_resources().get("CPU")
    with pytest.raises(RuntimeError) as info:
        ActorGroup(SumWorker, 2, num_cpus_per_worker=64, name="giant_policy", placement_timeout_s=1,
                   init_args=(0,))
    message = str(info.value)
    assert "'giant_policy'" in message
    assert "2 worker(s) x {'CPU': 64.0}" in message
    assert "Cluster total: {" in message and "'CPU': 4.0" in message
    assert ray.available_resources().get("CPU") == before  # the failed placement group was removed


def test_shutdown_frees_resources(ray_cluster):  # noqa: F811
    before = ray.available_resources().get("CPU")
    group = ActorGroup(SumWorker, 1, num_cpus_per_worker=0.5, name="short_lived", init_args=(0,))
    assert ray.get(group.call_rank(0, "all_reduce", 1.0)) == 1.0
    group.shutdown()
    group.shutdown()  # idempotent
    import time

    for _ in range(50):  # resource release is asynchronous
        if ray.available_resources().get("CPU") == before:
            break
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == before
