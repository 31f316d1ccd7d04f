"""swiftray/launch.py without a cluster: what stopping a node's `ray start --block` process does."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from swiftray.launch import _last_lines, _stop


def started(code: str) -> subprocess.Popen:
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=output, stderr=subprocess.STDOUT)
    proc.output = output  # as _ray_start attaches it
    return proc


def test_stopping_a_node_ends_its_process_and_closes_its_output_file() -> None:
    running = started("import time; print('up', flush=True); time.sleep(120)")
    _stop(running)
    assert running.returncode is not None and running.output.closed

    ended = started("print('node stopped: port in use')")
    ended.wait(timeout=30)
    assert _last_lines(ended) == "node stopped: port in use"  # read before stopping, as launch.py does
    _stop(ended)
    assert ended.output.closed
    _stop(None)  # a node never started
