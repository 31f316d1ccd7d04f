"""One local Ray cluster for the whole pytest session (`ray_cluster` fixture).

Tests that start actors take this fixture; starting Ray costs seconds, so it happens
once. Logical CPUs may exceed the physical ones: tests ask for fractions or whole
CPUs without caring how many cores the box has.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if ray.is_initialized():  # another module already started it (fixture imported twice)
        yield ray
        return
    # Ray's workers inherit this environment: they can import swiftray and classes defined
    # in test modules (cloudpickle pickles those by module name).
    path = [str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    ray.init(
        address="local",  # a new cluster, even while another one (`ray start`, cluster_utils) runs here
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=512 << 20,
        log_to_driver=True,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
