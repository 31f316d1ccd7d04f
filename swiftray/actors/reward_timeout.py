"""Reward functions with a time limit (--reward_timeout): they run in a child process of the reward
actor, which is ended when a call outlives the limit.

A Python function that hangs cannot be stopped from inside its own process (a signal alarm would
collide with math-verify's own, and C code ignores it), so the reward actor keeps a child process that
holds the real functions (spawned, so it starts clean; in its main thread, where math-verify's alarm
works). The actor's RewardSet calls proxies instead, so that validation, weights, NaN handling and
totals stay RewardSet's own. When a call on a batch times out, the child is ended and started again and
the batch is scored one sample at a time, each under the limit: the samples a function hangs on get no
reward from it (None), and are reported (`timeouts`: function, sample index) for the driver to log,
count and name.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
from typing import Any

from ray import cloudpickle

logger = logging.getLogger("swiftray")

START_TIMEOUT_S = 300.0


def _serve(conn: Any, config_bytes: bytes) -> None:
    """The child: build the reward functions, then answer (index, completions, kwargs) calls."""
    _die_with_parent()
    from swiftray.actors.reward import build_rewards
    from swiftray.rewards.registry import _call, _run_coroutines

    rewards = build_rewards(cloudpickle.loads(config_bytes))
    conn.send_bytes(b"ready")  # the time limit covers calls, not this start
    while True:
        try:
            index, completions, kwargs = cloudpickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            result = _call(rewards.funcs[index], completions, kwargs)
            if inspect.isawaitable(result):
                [result] = _run_coroutines([result])
                if isinstance(result, Exception):
                    raise result
            reply = ("ok", result)
        except Exception as err:  # noqa: BLE001 - sent back and raised in the actor, as in-process
            reply = ("error", err)
        try:
            data = cloudpickle.dumps(reply)
        except Exception as err:  # noqa: BLE001 - an unpicklable result or error: say what it was
            data = cloudpickle.dumps(("error", RuntimeError(f"{type(err).__name__}: {err}")))
        conn.send_bytes(data)


def _die_with_parent() -> None:
    """Linux: end this process when the reward actor's ends, even by SIGKILL (no orphan left hanging)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class RewardProcess:
    """The child process; `call` raises TimeoutError (and ends the child) when it takes over `timeout_s`."""

    def __init__(self, config: Any, timeout_s: float):
        self.config_bytes = cloudpickle.dumps(config)
        self.timeout_s = timeout_s
        self.proc = None
        self.conn = None

    def start(self) -> None:
        """A new child, once it has built the functions (imports are not a reward's time)."""
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.config_bytes), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_S) or self.conn.recv_bytes() != b"ready":
            self.stop()
            raise RuntimeError(f"reward functions: their process did not start within {START_TIMEOUT_S:g}s")

    def call(self, index: int, completions: list[str], kwargs: dict[str, Any]) -> Any:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send_bytes(cloudpickle.dumps((index, completions, kwargs)))
        if not self.conn.poll(self.timeout_s):
            self.stop()
            raise TimeoutError
        status, value = cloudpickle.loads(self.conn.recv_bytes())
        if status == "error":
            raise value
        return value

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = self.conn = None


class TimedReward:
    """Stands in for reward function `index` in the actor's RewardSet."""

    def __init__(self, process: RewardProcess, index: int, name: str, timeouts: list):
        self.process, self.index, self.name, self.timeouts = process, index, name, timeouts
        self.__name__ = name

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        try:
            return self.process.call(self.index, completions, kwargs)
        except TimeoutError:
            if len(completions) == 1:
                self.timeouts.append([self.name, 0])
                return [None]
        n = len(completions)
        logger.warning("reward function %r outlived --reward_timeout %gs on %d completions; scoring them one "
                       "at a time", self.name, self.process.timeout_s, n)
        values: list[float | None] = []
        for j in range(n):
            one = {k: [v[j]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in kwargs.items()}
            try:
                values += list(self.process.call(self.index, [completions[j]], one))
            except TimeoutError:
                self.timeouts.append([self.name, j])
                values.append(None)
        return values
