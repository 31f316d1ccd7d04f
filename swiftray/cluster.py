"""Start or join a Ray cluster, and size each role's resource request so that every role fits."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

logger = logging.getLogger("swiftray")


def init_ray(address: str | None = None) -> None:
    """Join `--ray_address` / RAY_ADDRESS, or start a local cluster sized to this machine."""
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
        # Logical CPUs are a scheduling budget, not threads: allow at least 4 so
        # that the roles of a small run all place on a 2-core machine.
        num_cpus = max(4, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True, configure_logging=False)


def worker_resources(num_workers: int, share: float = 1.0) -> tuple[float, float]:
    """(CPUs, GPUs) for each of `num_workers` policy workers taking `share` of the cluster.

    On GPU clusters each worker takes one GPU; CPUs are split so that other
    roles (rollout, reference, reward) still fit beside the policy.
    """
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0)
    cpus = total.get("CPU", 1)
    num_gpus = 1.0 if gpus >= num_workers else 0.0
    num_cpus = max(0.25, round(cpus * share / num_workers, 2))
    return num_cpus, num_gpus


def torch_threads(num_cpus: float) -> int:
    """Threads for a worker given `num_cpus` logical CPUs, capped by the real cores."""
    return max(1, min(int(num_cpus), os.cpu_count() or 1))
