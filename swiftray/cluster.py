"""Start or join a Ray cluster."""

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
        from swiftray.placement import local_cpus

        num_cpus = local_cpus()  # what the run was planned with before Ray started
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True, configure_logging=False)
