"""Start or join a Ray cluster.

A local cluster that swiftray starts listens on loopback only (every Ray server: GCS, raylet,
object manager, workers, the dashboard and runtime-env agents; the dashboard itself is not
started), unless asked to bind all interfaces so that other nodes may join it. It is stopped
when the driver ends, even by SIGKILL (ray_watchdog.py). Joining a cluster by address changes
neither.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ray

logger = logging.getLogger("swiftray")

# Ray binds its servers to the node's IP and turns a loopback node IP into the routable one, except
# when this is "0" (what it does on macOS/Windows, where clusters are off): then the node IP is
# 127.0.0.1 and every server binds to it. Read at import by each Ray process (hence the environment)
# and in the driver through ray_constants.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_watchdog: subprocess.Popen | None = None


def init_ray(address: str | None = None, *, bind_all_interfaces: bool = False) -> None:
    """Join `--ray_address` / RAY_ADDRESS, or start a local cluster sized to this machine.

    bind_all_interfaces: the local cluster's servers listen on every network interface (other
    machines may then join it with `ray start --address`); by default they listen on 127.0.0.1.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Actors import swiftray; when it is not installed (a source checkout under
    # `ray job submit`), ship the package directory with the job.
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p),
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                # Spinning OpenMP threads stall each other on a shared CPU box (10x slower steps
                # measured with 2 threads on a loaded 2-core machine); passive waiting costs little.
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    runtime_env = {"env_vars": env_vars}
    if address:
        logger.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as err:
            # Ray sends the auth token to an explicit address only with RAY_AUTH_MODE=token.
            raise ConnectionError(
                f"cannot join the Ray cluster at {address} ({err}); is `ray start --head` running there? "
                "If the cluster uses token auth (Ray's default), set RAY_AUTH_MODE=token here "
                "(the token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from err
    else:
        from swiftray.placement import local_cpus

        num_cpus = local_cpus()  # what the run was planned with before Ray started
        start_watchdog()
        with contextlib.nullcontext() if bind_all_interfaces else loopback_only():
            # address="local": a new cluster. Without it, ray.init() joins a cluster that `ray start`
            # left on this machine (and then refuses num_cpus); --ray_address auto still joins one.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=True, configure_logging=False)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While a local Ray starts: node IP 127.0.0.1, so that all its servers bind to loopback.

    Undone afterwards, so that this process may still join a remote cluster later."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = saved_env


def start_watchdog() -> None:
    """Once per driver: a process that stops this driver's Ray processes when the driver ends."""
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    script = Path(__file__).with_name("ray_watchdog.py")
    # Its own session: Ctrl-C in the terminal reaches the driver (which then shuts Ray down), not it.
    # Only this process holds the pipe's write end (close_fds), so EOF means this process is gone.
    _watchdog = subprocess.Popen([sys.executable, str(script), str(os.getpid())], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                 close_fds=True)
