"""Chunks of prompts through the stateless roles (rollout, then each role of a phase), re-issued when an
actor dies, so that a step completes whatever actors it loses.

A request's prompts are cut into chunks of --rollout_batch_size; chunk j samples with seed + j on
whichever engine runs it, so issuing a chunk again (on another engine) gives the same rollouts. Each
chunk goes through stages: "generate" on a rollout engine, then `annotate` on one actor of each role of
the phase. Every stage call returns (result, receipt) (`DistributedWorker.call_with_receipt`): the
driver waits on receipts only, and a failed receipt says what happened:

    the stage's own actor died (ActorDiedError, ActorUnavailableError)  -> replace it, issue the stage again
    an earlier stage failed (RayTaskError wrapping an actor error)      -> handled at that earlier stage
    its input is lost (ObjectLostError: it lived on a node that is gone) -> issue the chunk from "generate"
    anything else (a reward function raised)                            -> the run's error, raised

Engines take generate calls from a queue, at most DEPTH outstanding each, so that an engine that joins
takes work as soon as it is up and an engine that leaves hands its chunks back; `flush` hands out all
that is queued (before a weight sync, so that every chunk requested before it runs on the weights it
was requested with, as without the queue).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

logger = logging.getLogger("swiftray")

DEPTH = 2  # generate calls outstanding per engine


def classify(err: BaseException) -> str:
    """"actor" (the called actor died), "upstream" (an input's producer failed), "lost" (an input's
    object is gone) or "error" (the call itself raised)."""
    lost = (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, lost):
            return "lost"
        return "upstream" if isinstance(cause, ray.exceptions.RayActorError) else "error"
    if isinstance(err, lost):
        return "lost"
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return "actor"
    return "error"


@dataclass
class Chunk:
    """One chunk's way through the stages. `refs[s]` / `receipts[s]`: stage s's result and receipt refs;
    `epochs[s]` grows whenever stage s is issued again, so that receipts of an abandoned issue are ignored
    (those of earlier stages, still outstanding, still count)."""

    index: int
    stages: list[str]  # role names: "rollout" (generate), then annotating roles
    rows: list[dict[str, Any]] | None = None  # generate's input
    params: Any = None
    seed: int | None = None
    prompt_ids: list[int] = field(default_factory=list)
    source: Any = None  # an annotate-only chunk's input ref
    refs: list[Any] = field(default_factory=list)
    receipts: list[Any] = field(default_factory=list)
    actors: list[Any] = field(default_factory=list)
    done: list[dict[str, Any] | None] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    issues: int = 0

    @property
    def result(self) -> Any:
        return self.refs[-1]


@dataclass
class Request:
    """What `Work.start` returns: the chunks of one request; `step` None for evaluation."""

    chunks: list[Chunk]
    step: int | None
    resample: int = 0
    started: float = field(default_factory=time.time)


class Work:
    """Issues chunks' stages and drives them to the end, through the supervisor's actors."""

    def __init__(self, supervisor: Any):
        self.supervisor = supervisor
        self.queue: deque[tuple[Chunk, int]] = deque()
        # receipt ref -> (chunk, stage, its epoch, the call's result ref)
        self.outstanding: dict[Any, tuple[Chunk, int, int, Any]] = {}
        self.load: dict[Any, int] = {}  # engine actor id -> generate calls outstanding
        self.chunk_of: dict[Any, Chunk] = {}  # a chunk's final ref -> the chunk (annotate continues it)

    # --- issuing -------------------------------------------------------------------------------------
    def start(self, chunks: list[Chunk], step: int | None, resample: int = 0) -> Request:
        for chunk in chunks:
            self._issue(chunk, 0)
        self._pump()
        return Request(chunks, step, resample)

    def continue_with(self, refs: list[Any], stages: list[str]) -> Request:
        """`stages` applied to each of `refs`: a chunk's result continues that chunk (so that a lost input
        can be generated again); any other ref (a filtered batch) becomes a chunk of its own."""
        if not stages:
            raise ValueError("continue_with: no stages to apply")
        chunks = []
        for j, ref in enumerate(refs):
            chunk = self.chunk_of.get(ref)
            if chunk is None:
                chunk = Chunk(index=j, stages=[], source=ref)
            first = len(chunk.stages)
            chunk.stages = chunk.stages + list(stages)
            chunk.done += [None] * len(stages)
            chunk.epochs += [0] * len(stages)
            for s in range(first, len(chunk.stages)):
                self._call(chunk, s)
            chunks.append(chunk)
        return Request(chunks, None)

    def _issue(self, chunk: Chunk, stage: int) -> None:
        """(Re-)issue `chunk` from `stage` on; the generate stage waits in the queue for an engine."""
        chunk.epochs = (chunk.epochs + [0] * len(chunk.stages))[:len(chunk.stages)]
        for s in range(stage, len(chunk.stages)):
            chunk.epochs[s] += 1
        chunk.issues += stage == 0
        chunk.done = chunk.done[:stage] + [None] * (len(chunk.stages) - stage)
        chunk.refs, chunk.receipts, chunk.actors = chunk.refs[:stage], chunk.receipts[:stage], chunk.actors[:stage]
        if stage == 0 and chunk.stages and chunk.stages[0] == "rollout":
            self.queue.append((chunk, chunk.epochs[0]))
            return
        for s in range(stage, len(chunk.stages)):
            self._call(chunk, s)

    def _call(self, chunk: Chunk, s: int) -> None:
        role = chunk.stages[s]
        if role == "rollout":
            actor = self._least_loaded_engine()
            args = ("generate", chunk.rows, chunk.params, chunk.seed)
            self.load[actor._actor_id] = self.load.get(actor._actor_id, 0) + 1
        else:
            actors = self.supervisor.actors(role)
            actor = actors[chunk.index % len(actors)]
            args = ("annotate", chunk.refs[s - 1] if s else chunk.source)
        result, receipt = actor.call_with_receipt.options(num_returns=2).remote(*args)
        chunk.refs.append(result)
        chunk.receipts.append(receipt)
        chunk.actors.append(actor)
        self.outstanding[receipt] = (chunk, s, chunk.epochs[s], result)

    def _least_loaded_engine(self) -> Any:
        engines = self.supervisor.actors("rollout")
        return min(engines, key=lambda a: self.load.get(a._actor_id, 0))

    def _pump(self) -> None:
        """Hand queued chunks to engines with fewer than DEPTH generate calls outstanding."""
        while self.queue:
            engines = self.supervisor.actors("rollout")
            if min(self.load.get(a._actor_id, 0) for a in engines) >= DEPTH:
                return
            chunk, epoch = self.queue.popleft()
            if epoch == chunk.epochs[0]:
                for s in range(len(chunk.stages)):
                    self._call(chunk, s)

    def flush(self) -> None:
        """Hand out every queued chunk now (before a weight sync: they run on the current weights)."""
        while self.queue:
            chunk, epoch = self.queue.popleft()
            if epoch == chunk.epochs[0]:
                for s in range(len(chunk.stages)):
                    self._call(chunk, s)

    # --- waiting -------------------------------------------------------------------------------------
    def finish(self, request: Request) -> list[Any]:
        """Wait until every chunk of `request` has been through all its stages, replacing dead actors and
        re-issuing what they held; the chunks' final refs, in order."""
        while not all(all(d is not None for d in c.done) for c in request.chunks):
            self._pump()
            if not self.outstanding:
                raise RuntimeError("work: chunks unfinished but nothing outstanding")  # a bug, not a fault
            ready, _ = ray.wait(list(self.outstanding), num_returns=1, timeout=1.0)
            for receipt in ready:
                self._settle(receipt)
        for chunk in request.chunks:
            self.chunk_of[chunk.result] = chunk
        return [c.result for c in request.chunks]

    def _settle(self, receipt: Any) -> None:
        chunk, s, epoch, result = self.outstanding.pop(receipt)
        if chunk.stages[s] == "rollout" and s < len(chunk.actors):
            actor_id = chunk.actors[s]._actor_id
            self.load[actor_id] = max(0, self.load.get(actor_id, 0) - 1)
        try:
            done = ray.get(receipt)
        except Exception as raised:  # noqa: BLE001 - sorted below; what is not a fault is raised again
            err = raised
            # The result ref holds the same error; read it, or Ray prints "Unhandled error" when it is dropped.
            with contextlib.suppress(Exception):
                ray.get(result, timeout=0)
        else:
            if epoch == chunk.epochs[s]:
                chunk.done[s] = done
            return
        if epoch != chunk.epochs[s]:
            return  # an abandoned issue
        kind = classify(err)
        if kind == "error":
            raise err
        if kind == "upstream":
            return  # the earlier stage's own receipt re-issues the chunk
        role = chunk.stages[s]
        if kind == "actor":
            self.supervisor.lost(role, chunk.actors[s], err)
            self._issue(chunk, s)
        else:  # the input is gone: from the start (a generated chunk), or the run's error
            if chunk.rows is None:
                raise RuntimeError(f"{role}: the input of chunk {chunk.index} was lost with its node and it "
                                   "cannot be generated again (it came from dynamic sampling's filter)") from err
            logger.warning("chunk %d: its rollouts were lost with their node; generating them again", chunk.index)
            self._issue(chunk, 0)

    def forget(self) -> None:
        """Drop the bookkeeping of finished chunks (once a step has trained on them)."""
        live = {id(c) for c, _, _, _ in self.outstanding.values()} | {id(c) for c, _ in self.queue}
        self.chunk_of = {ref: c for ref, c in self.chunk_of.items() if id(c) in live}

    def abandon(self) -> None:
        """Forget everything issued (the policy went back to a checkpoint: requests made since are void)."""
        self.queue.clear()
        self.outstanding.clear()
        self.load.clear()
        self.chunk_of.clear()


def ledger_entries(request: Request) -> list[dict[str, Any]]:
    """What the ledger keeps of a finished request's chunks."""
    out = []
    for chunk in request.chunks:
        first = chunk.done[0] or {}
        timeouts = [{"function": name, "sample": j,
                     "prompt": chunk.prompt_ids[g] if g < len(chunk.prompt_ids) else None}
                    for receipt in chunk.done if receipt for name, j, g in receipt.get("reward_timeouts", [])]
        out.append({"chunk": chunk.index, "prompts": list(chunk.prompt_ids), "seed": chunk.seed,
                    "rollout_version": first.get("version"), "node": first.get("node"), "engine_pid": first.get("pid"),
                    "issues": chunk.issues, "resample": request.resample, "reward_timeouts": timeouts})
    return out
