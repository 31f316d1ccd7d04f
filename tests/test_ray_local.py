"""The local Ray cluster that swiftray starts listens on loopback only and never outlives its driver.

Each driver here is a subprocess with its own local cluster (not the test session's): a
`swiftray sft` run on the tiny model, checked for listening sockets while it trains and then
SIGKILLed; and a bare `init_ray` driver, stopped with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _ray import REPO

SETTLE_S = 20  # the watchdog's SIGTERM, 3 s of grace, SIGKILL; generous on a loaded machine


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no session cluster to join
    env.update(SWIFTRAY_NO_PROGRESS="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def running(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], timeout: float = SETTLE_S) -> list[str]:
    deadline = time.monotonic() + timeout
    while running(procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    return running(procs)


def listening(procs: list[psutil.Process]) -> list[tuple[str, str]]:
    """(process name, bound address) of every listening TCP socket and bound UDP socket of procs."""
    out = []
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                    out.append((proc.name(), conn.laddr.ip))
        except psutil.NoSuchProcess:
            pass
    return out


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def kill_leftovers(procs: list[psutil.Process]) -> None:
    """Test cleanup after a failure: only the processes this test started."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def sft_driver(tiny_model_dir, tmp_path_factory):
    """A `swiftray sft` subprocess that has started training (its first step is logged)."""
    out = tmp_path_factory.mktemp("ray_local")
    log_path = out / "driver.log"
    cmd = [sys.executable, "-m", "swiftray", "sft", "--model", str(tiny_model_dir), "--train_type", "lora",
           "--dataset", "swiftray/arithmetic#64", "--max_steps", "1000", "--per_device_train_batch_size", "2",
           "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_strategy", "no",
           "--report_to", "none", "--num_cpus_per_worker", "1", "--gradient_checkpointing", "false",
           "--dataset_num_proc", "1", "--output_dir", str(out / "run")]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=base_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not any(p.stat().st_size for p in Path(out / "run").glob("v*/logging.jsonl")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"swiftray sft did not start training:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        seen = tree(proc.pid)
        yield proc
    finally:
        kill_leftovers([*seen, *(tree(proc.pid) if proc.poll() is None else [])])
        proc.wait()


def test_local_ray_of_a_run_listens_on_loopback_only(sft_driver):
    sockets = listening(tree(sft_driver.pid))
    names = {name for name, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the check sees Ray's servers
    assert len(sockets) >= 6, sockets
    assert [s for s in sockets if not is_loopback(s[1])] == []


def test_sigkill_of_the_driver_leaves_no_ray_process(sft_driver):
    procs = tree(sft_driver.pid)
    assert {"gcs_server", "raylet"} <= {p.name() for p in procs}
    os.kill(sft_driver.pid, signal.SIGKILL)
    sft_driver.wait()
    assert wait_gone(procs) == []


# The driver takes Ctrl-C as a terminal's foreground process does: a suite started as a shell's background
# job (`pytest ... &`) runs with SIGINT ignored, and a child inherits that, so it is set back here.
BARE_DRIVER = """
import signal, sys, time, ray
signal.signal(signal.SIGINT, signal.default_int_handler)
from swiftray.cluster import init_ray
init_ray(bind_all_interfaces=sys.argv[1] == "all")
print("node_ip", ray.util.get_node_ip_address(), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("bind", ["loopback", "all"])
def test_ctrl_c_stops_the_local_ray_and_binding_all_interfaces_is_asked_for(bind):
    proc = subprocess.Popen([sys.executable, "-c", BARE_DRIVER, bind], env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("node_ip"), f"driver did not start Ray (exit code {proc.poll()})"
        node_ip = line.split()[1]
        procs = tree(proc.pid)
        gcs_ips = {ip for name, ip in listening(procs) if name == "gcs_server"}
        assert gcs_ips
        if bind == "loopback":
            assert is_loopback(node_ip) and all(is_loopback(ip) for ip in gcs_ips)
        elif not is_loopback(node_ip):  # a machine with only loopback has nothing else to bind
            assert not all(is_loopback(ip) for ip in gcs_ips)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert wait_gone(procs) == []
    finally:
        kill_leftovers(procs)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
