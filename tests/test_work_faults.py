"""controller/work.py with real Ray actors: a chunk whose engine dies mid-call is issued again on the
replacement, and the failed calls' refs (the dead engine's, and the next stage's that waited on it) leave
no "Unhandled error" line on the console."""

from __future__ import annotations

import gc
import logging
import time

import ray
from _ray import ray_cluster  # noqa: F401  (session fixture)

from swiftray.actors.group import DistributedWorker
from swiftray.controller.work import Chunk, Work


@ray.remote(num_cpus=0)
class SlowEngine(DistributedWorker):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def generate(self, rows: list[str], params: object, seed: int) -> list[str]:
        time.sleep(self.delay)
        return [f"{row}-{seed}" for row in rows]


@ray.remote(num_cpus=0)
class Annotator(DistributedWorker):
    def annotate(self, rows: list[str]) -> list[str]:
        return [row.upper() for row in rows]


class OneEngineSupervisor:
    """What Work asks of the supervisor: the live actors of a role, and a replacement for a lost one."""

    def __init__(self) -> None:
        self.engines = [SlowEngine.remote(60.0)]
        self.annotators = [Annotator.remote()]
        self.lost_errors: list[str] = []

    def actors(self, role: str) -> list:
        return self.engines if role == "rollout" else self.annotators

    def lost(self, role: str, actor: object, err: BaseException) -> None:
        self.lost_errors.append(type(err).__name__)
        self.engines = [SlowEngine.remote(0.0)]


def test_a_chunk_whose_engine_dies_runs_again_and_leaves_no_unhandled_error(ray_cluster, capfd, caplog):  # noqa: F811
    supervisor = OneEngineSupervisor()
    work = Work(supervisor)
    ray.get(supervisor.engines[0].node_id.remote(), timeout=120)  # the engine is up
    # Two stages, as a step's are: the annotate call waits on the generate call's result, so the engine's
    # death fails it too (a task error on the driver, which Ray reports if nobody reads it).
    request = work.start([Chunk(index=0, stages=["rollout", "reward"], rows=["a", "b"], seed=3)], step=1)
    time.sleep(0.5)  # its generate call has started (and sleeps)
    ray.kill(supervisor.engines[0])
    with caplog.at_level(logging.ERROR):
        [ref] = work.finish(request)
        assert ray.get(ref) == ["A-3", "B-3"]  # the same chunk, seed and all, on the replacement
        assert supervisor.lost_errors == ["ActorDiedError"]
        del ref, request
        work.forget()
        gc.collect()
        time.sleep(1.0)  # Ray reports an unread error when its last ref goes; give it time to arrive
    console = capfd.readouterr()
    assert "Unhandled error" not in console.out + console.err + caplog.text
