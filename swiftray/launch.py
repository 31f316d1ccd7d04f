"""Multi-node launch, ms-swift's way: the same command on every node, told apart by the environment.

    NNODES=3 NODE_RANK=r MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 swiftray rlhf ...

NODE_RANK 0 starts a Ray head listening at MASTER_ADDR:MASTER_PORT (or joins the one already there),
waits until NNODES nodes are in the cluster, and drives the run. Every other rank starts a Ray node that
joins the head (retrying until the head is up), stays while the run goes on, and exits with the run's
status, which the driver leaves in the cluster's key-value store when it ends; a head that disappears
without leaving one makes the node exit with 1. The other way in, `ray start` on every node then
`ray job submit -- swiftray ...` (or --ray_address), needs none of this.

Ray's nodes run as `ray start --block` child processes: ending that process (SIGTERM) stops exactly the
node it started, never another Ray on the machine. SWIFTRAY_RAY_START_ARGS adds flags to this node's
`ray start` (its GPUs or resources; distinct ports when several nodes share one machine, as in tests). A head started with token authentication (Ray's
default) needs the same token on every node (~/.ray/auth_token or RAY_AUTH_TOKEN), as `ray start` does.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from swiftray.arguments import ArgumentError

logger = logging.getLogger("swiftray")

NAMESPACE = "swiftray"
STATUS_KEY = b"run_status"
NODES_TIMEOUT_S = float(os.environ.get("SWIFTRAY_NODES_TIMEOUT_S", "600"))
HEAD_LOST_S = 60.0
NODE_START_TRIES = 3  # a node's `ray start` can lose a port it picked to another process starting at once


def multi_node(args: Any) -> bool:
    """NNODES > 1 with a NODE_RANK and a MASTER_ADDR, and no cluster address given: launch ms-swift's way."""
    if getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS"):
        return False
    return int(os.environ.get("NNODES", "1") or 1) > 1 and "NODE_RANK" in os.environ


def launch_env() -> tuple[int, int, str]:
    """(NNODES, NODE_RANK, head address) from the environment, checked."""
    nnodes = int(os.environ.get("NNODES", "1"))
    try:
        rank = int(os.environ["NODE_RANK"])
    except ValueError:
        raise ArgumentError(f"NODE_RANK={os.environ['NODE_RANK']!r}: expected an integer 0..NNODES-1") from None
    if not 0 <= rank < nnodes:
        raise ArgumentError(f"NODE_RANK={rank}: expected 0..{nnodes - 1} (NNODES={nnodes})")
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        raise ArgumentError("NNODES > 1 with NODE_RANK: MASTER_ADDR must name the head node (NODE_RANK 0)")
    port = os.environ.get("MASTER_PORT", "29500")
    if not port.isdigit():
        raise ArgumentError(f"MASTER_PORT={port!r}: expected a port number")
    return nnodes, rank, f"{addr}:{port}"


def _ray_start(*flags: str) -> subprocess.Popen:
    """`ray start --block` with `flags`, and SWIFTRAY_RAY_START_ARGS (more `ray start` flags for this node:
    --num-gpus, --resources, or ports when several nodes share a machine)."""
    flags = (*flags, *shlex.split(os.environ.get("SWIFTRAY_RAY_START_ARGS", "")))
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    env.pop("RAY_ADDRESS", None)
    output = tempfile.TemporaryFile("w+")  # read back only to explain a node that stopped
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
                             *flags], env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    proc.output = output  # type: ignore[attr-defined]
    return proc


def _last_lines(proc: subprocess.Popen, n: int = 5) -> str:
    """The end of what a stopped `ray start` printed."""
    output = proc.output  # type: ignore[attr-defined]
    output.seek(0)
    return "\n".join(output.read().strip().splitlines()[-n:])


def _stop(proc: subprocess.Popen | None) -> None:
    """End a `ray start --block` process: it stops the node it started. Its output file goes with it."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.output.close()  # type: ignore[attr-defined]


def _gcs(address: str) -> Any:
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def _listening(address: str) -> bool:
    """Whether something accepts connections at host:port (the head's GCS, once it is up)."""
    import socket

    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def _status(address: str) -> int | None:
    value = _gcs(address).internal_kv_get(STATUS_KEY, NAMESPACE.encode(), timeout=5)
    return None if value is None else int(value)


def run_node(run: Callable[[Any], None], args: Any) -> int:
    """Run this node's part of a multi-node launch; the exit status."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    nnodes, rank, address = launch_env()
    if rank == 0:
        return _drive(run, args, nnodes, address)
    return _serve(address, rank)


def _drive(run: Callable[[Any], None], args: Any, nnodes: int, address: str) -> int:
    import ray

    from swiftray.cluster import init_ray

    host, port = address.rsplit(":", 1)
    head = None
    if _listening(address):  # a head already there: join it
        logger.info("NODE_RANK 0: joining the Ray head at %s", address)
    else:
        logger.info("NODE_RANK 0: starting a Ray head at %s", address)
        head = _ray_start("--head", f"--port={port}", f"--node-ip-address={host}", "--include-dashboard=false")
    status = 1
    try:
        deadline = time.time() + NODES_TIMEOUT_S
        while True:
            try:
                init_ray(address)
                break
            except ConnectionError:
                if time.time() > deadline or (head is not None and head.poll() is not None):
                    raise
                time.sleep(2)
        args.ray_address = address
        while (alive := sum(n["Alive"] for n in ray.nodes())) < nnodes:
            if time.time() > deadline:
                raise RuntimeError(f"NNODES={nnodes}: only {alive} node(s) joined {address} within "
                                   f"{NODES_TIMEOUT_S:g}s (SWIFTRAY_NODES_TIMEOUT_S)")
            time.sleep(1)
        logger.info("NNODES=%d: every node joined %s", nnodes, address)
        run(args)
        status = 0
    finally:
        try:
            _gcs(address).internal_kv_put(STATUS_KEY, str(status).encode(), True, NAMESPACE.encode(), timeout=5)
            _wait_for_workers(address, nnodes)
        except Exception as err:  # noqa: BLE001 - the head is gone already; the nodes notice that too
            logger.warning("could not leave the run's status for the other nodes: %s", err)
        ray.shutdown()
        _stop(head)
    return status


def _wait_for_workers(address: str, nnodes: int, timeout_s: float = 30) -> None:
    """Give the other nodes time to read the status before the head goes."""
    deadline = time.time() + timeout_s
    gcs = _gcs(address)
    while time.time() < deadline:
        acks = sum(gcs.internal_kv_get(f"ack/{r}".encode(), NAMESPACE.encode(), timeout=5) is not None
                   for r in range(1, nnodes))
        if acks >= nnodes - 1:
            return
        time.sleep(0.5)


def _serve(address: str, rank: int) -> int:
    """A node that joins the head and stays until the run leaves its status."""
    deadline = time.time() + NODES_TIMEOUT_S
    node = None
    try:
        while node is None:
            if _listening(address):
                node = _ray_start(f"--address={address}")
            else:  # the head is not up yet
                if time.time() > deadline:
                    logger.error("NODE_RANK %d: no Ray head at %s within %gs", rank, address, NODES_TIMEOUT_S)
                    return 1
                time.sleep(2)
        logger.info("NODE_RANK %d: joined %s; waiting for the run to end", rank, address)
        unreachable_since, starts = None, 1
        while True:
            if node.poll() is not None:
                if starts < NODE_START_TRIES and _listening(address):
                    logger.warning("NODE_RANK %d: this node's Ray stopped (exit %s); starting it again:\n%s",
                                   rank, node.returncode, _last_lines(node))
                    node, starts = _ray_start(f"--address={address}"), starts + 1
                    continue
                logger.error("NODE_RANK %d: this node's Ray stopped (exit %s):\n%s", rank, node.returncode,
                             _last_lines(node))
                return 1
            try:
                status = _status(address) if _listening(address) else None
                if status is None and not _listening(address):
                    raise ConnectionError(address)
                unreachable_since = None
            except Exception:  # noqa: BLE001 - the head is not answering
                status = None
                unreachable_since = unreachable_since or time.time()
                if time.time() - unreachable_since > HEAD_LOST_S:
                    logger.error("NODE_RANK %d: the head at %s went away without the run's status", rank, address)
                    return 1
            if status is not None:
                try:
                    _gcs(address).internal_kv_put(f"ack/{rank}".encode(), b"1", True, NAMESPACE.encode(), timeout=5)
                except Exception:  # noqa: BLE001 - the head may be going already
                    pass
                logger.info("NODE_RANK %d: the run ended with status %d", rank, status)
                return status
            time.sleep(1)
    finally:
        _stop(node)
