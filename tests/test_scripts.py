"""The user-facing scripts against a real `ray start --head`: the reference self-cognition
command (joining the cluster through RAY_ADDRESS), its infer command, and the `ray job submit` version.

The head gets its own ports and temp folder, so it neither collides with another cluster on this
machine nor becomes the cluster a plain `ray.init()` elsewhere would join; it is stopped through
the pid of the `ray start --block` process that this test started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _ray import REPO

from swiftray import checkpoint as ckpt

pytestmark = pytest.mark.slow  # about 2 minutes on a busy 2-core machine
BIN = Path(sys.executable).parent  # the venv's `swiftray` and `ray`


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", SWIFTRAY_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


@pytest.fixture
def ray_head():
    """(GCS address, job server URL) of a fresh local head; stopped at the end."""
    gcs, dashboard, *others = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log_path = Path(temp_dir) / "head.log"
    flags = ["--port", gcs, "--dashboard-port", dashboard, "--ray-client-server-port", others[0],
             "--dashboard-agent-listen-port", others[1], "--dashboard-agent-grpc-port", others[2],
             "--runtime-env-agent-port", others[3], "--metrics-export-port", others[4],
             "--node-manager-port", others[5], "--object-manager-port", others[6]]
    with open(log_path, "w") as log:
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "4",
                                 "--object-store-memory", str(300 << 20), "--include-dashboard", "true",
                                 "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", temp_dir,
                                 *map(str, flags)],
                                stdout=log, stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops the node's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the session this test started for the head
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_script(name: str, cwd: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(REPO / "scripts" / name)], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_self_cognition_scripts_on_a_ray_head(ray_head, tmp_path):
    gcs_address, job_server = ray_head
    work = tmp_path / "work"
    work.mkdir()

    # 1. The reference `swift sft` command, joining the head through RAY_ADDRESS. The head has Ray's
    # default token auth; a client sends the token to an explicit address only with RAY_AUTH_MODE=token.
    sft = run_script("sft_self_cognition.sh", work, {**base_env(), "RAY_ADDRESS": gcs_address,
                                                     "RAY_AUTH_MODE": "token", "MAX_STEPS": "2"})
    assert f"joining Ray cluster at {gcs_address}" in sft.stderr
    (run,) = sorted((work / "output").glob("v*-*"))
    last = ckpt.latest_checkpoint(run)
    assert last.name == "checkpoint-2" and (last / "adapter_model.safetensors").is_file()
    args = ckpt.read_args(run)
    assert (args["torch_dtype"], args["model_name"], args["model_author"]) == ("bfloat16", ["swift-robot"], ["swift"])
    assert args["dataset"] == ["swiftray/arithmetic#200", "swift/self-cognition:qwen3#600"]
    steps = [json.loads(line)["step"] for line in (run / "logging.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    # 2. Its infer command on the last checkpoint, driven through stdin.
    infer = run_script("infer_self_cognition.sh", work, {**base_env(), "MAX_NEW_TOKENS": "16"},
                       stdin="who are you?\nexit\n")
    assert infer.stdout.count("<<< ") == 2 and "-" * 40 in infer.stdout

    # 3. The same training as a Ray job.
    job = run_script("ray_job_submit_sft.sh", work, {**base_env(), "RAY_API_SERVER_ADDRESS": job_server,
                                                     "MAX_STEPS": "1"})
    assert "succeeded" in job.stdout + job.stderr
    runs = sorted((work / "output").glob("v*-*"))
    assert len(runs) == 2 and ckpt.latest_checkpoint(runs[1]).name == "checkpoint-1"
    assert ckpt.read_args(runs[1])["model"] == str((work / "tiny-qwen3").resolve())
