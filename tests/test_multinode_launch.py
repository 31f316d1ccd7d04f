"""Multi-node launch ms-swift's way (swiftray/launch.py): the same `swiftray rlhf` command on three "nodes"
(three processes, each with a Ray node of its own), told apart by NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT.
Rank 0 starts the head and drives; ranks 1 and 2, started first, wait for it, join, and exit with the
run's status; the policy has NPROC_PER_NODE x NNODES ranks. No Ray process is left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
from _ray import REPO

pytestmark = pytest.mark.slow


def node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def free_port(ip: str) -> int:
    """A free port below Linux's ephemeral range (32768 up): a port the kernel handed out would be free
    only until some outgoing connection of the busy test machine takes it, and a Ray node that then binds
    it dies with "Address already in use". Above Ray's worker ports (10002-19999)."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
            return port


def node_ports(ip: str, head: bool) -> str:
    """`ray start` flags giving one node of this machine ports of its own (Ray's fixed defaults collide)."""
    names = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port"] + (["--ray-client-server-port", "--dashboard-port"] if head else [])
    return " ".join(f"{name}={free_port(ip)}" for name in names)


def cluster_processes(address: str) -> list[str]:
    """Ray processes (GCS server, raylets) of the cluster at `address`."""
    out = subprocess.run(["pgrep", "-af", address], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "gcs_server" in line or "raylet" in line]


def stop_cluster(ip: str, port: int) -> None:
    """SIGKILL what is left of the cluster at ip:port (after a failure: the nodes' `ray start` processes
    run in sessions of their own, so killing a launch leaves them behind to disturb the next tests)."""
    out = subprocess.run(["pgrep", "-f", f"{ip}:{port}|--port={port} "], capture_output=True, text=True).stdout
    for pid in map(int, out.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_same_command_on_three_nodes_runs_one_job(tiny_model_dir, tmp_path):
    ip = node_ip()
    port = free_port(ip)
    command = [sys.executable, "-m", "swiftray", "rlhf", "--rlhf_type", "grpo", "--model", str(tiny_model_dir),
               "--dataset", "swiftray/arithmetic#32", "--train_type", "full", "--max_steps", "1",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_generations", "4",
               "--max_completion_length", "6", "--report_to", "none", "--save_strategy", "no", "--beta", "0",
               "--eval_strategy", "no", "--reward_funcs", "format", "--logging_steps", "1",
               "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "NNODES": "3", "NPROC_PER_NODE": "1", "MASTER_ADDR": ip, "MASTER_PORT": str(port),
           "SWIFTRAY_NODES_TIMEOUT_S": "300",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "SWIFTRAY_NO_PROGRESS": "1"}
    env.pop("RAY_ADDRESS", None)
    procs, logs = {}, {rank: tmp_path / f"node{rank}.log" for rank in (0, 1, 2)}
    for rank in (1, 2, 0):  # the other nodes first: they wait for the head
        # Output to files, not pipes: a pipe nobody reads yet fills up and blocks its writer mid-run.
        with logs[rank].open("w") as log:
            procs[rank] = subprocess.Popen(command, env={**env, "NODE_RANK": str(rank),
                                                         "SWIFTRAY_RAY_START_ARGS": node_ports(ip, head=rank == 0)},
                                           stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        time.sleep(1 if rank else 0)
    try:
        for proc in procs.values():
            proc.wait(timeout=900)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                stop_cluster(ip, port)
    outputs = {rank: log.read_text(errors="replace") for rank, log in logs.items()}
    every_output = "\n".join(f"--- NODE_RANK {rank}:\n{outputs[rank][-2500:]}" for rank in sorted(outputs))
    assert [procs[rank].returncode for rank in (0, 1, 2)] == [0, 0, 0], every_output
    assert "NNODES=3: every node joined" in outputs[0]
    assert "the run ended with status 0" in outputs[1] and "the run ended with status 0" in outputs[2]
    [run_dir] = list((tmp_path / "out").glob("v*"))
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1]
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger[0]["prompts"]) == 3  # 4 per rank x 3 ranks / 4 generations
    time.sleep(2)
    assert cluster_processes(f"{ip}:{port}") == [], "a Ray process of the launch is still running"


def test_ray_start_on_three_nodes_then_ray_job_submit(tiny_model_dir, tmp_path):
    """The other way in: `ray start` on every node (here three Ray nodes of this machine), then
    `ray job submit -- swiftray rlhf ...`. The head has no CPUs and each other node 2, while the roles ask
    for 3 (policy 1.5, two engines 0.5 each, reward and reference 0.25 each): the job runs across nodes."""
    from swiftray.launch import _listening, _ray_start, _stop

    ip = node_ip()
    port, dashboard = free_port(ip), free_port(ip)
    env_keys = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    nodes = []
    try:
        os.environ.pop("RAY_ADDRESS", None)
        nodes.append(_ray_start("--head", f"--port={port}", f"--node-ip-address={ip}", "--num-cpus=0",
                                "--include-dashboard=true", f"--dashboard-host={ip}", f"--dashboard-port={dashboard}",
                                *node_ports(ip, head=False).split(), f"--ray-client-server-port={free_port(ip)}"))
        deadline = time.time() + 120
        while not _listening(f"{ip}:{port}") and time.time() < deadline:
            time.sleep(1)
        for _ in range(2):  # one at a time: two raylets starting at once can pick the same free port
            nodes.append(_ray_start(f"--address={ip}:{port}", "--num-cpus=2", *node_ports(ip, head=False).split()))
            time.sleep(5)
        env = {**env_keys, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO), "SWIFTRAY_NO_PROGRESS": "1",
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        wait = (f"import ray, time; ray.init(address='{ip}:{port}'); t = time.time()\n"
                "while sum(n['Alive'] for n in ray.nodes()) < 3 and time.time() - t < 120: time.sleep(1)\n"
                "print('nodes', sum(n['Alive'] for n in ray.nodes()))")
        assert "nodes 3" in subprocess.run([sys.executable, "-c", wait], env=env, capture_output=True, text=True,
                                           timeout=200).stdout
        out = tmp_path / "out"
        job = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", f"http://{ip}:{dashboard}",
             "--", sys.executable, "-m", "swiftray", "rlhf", "--rlhf_type", "grpo", "--model", str(tiny_model_dir),
             "--dataset", "swiftray/arithmetic#32", "--train_type", "full", "--max_steps", "1",
             "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--num_generations", "4",
             "--max_completion_length", "6", "--report_to", "none", "--save_strategy", "no", "--beta", "0.04",
             "--eval_strategy", "no", "--reward_funcs", "format", "--num_infer_workers", "2",
             "--num_cpus_per_worker", "1.5", "--output_dir", str(out)],
            env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-4000:]
    except BaseException:
        stop_cluster(ip, port)
        raise
    finally:
        for node in reversed(nodes):
            _stop(node)
    [run_dir] = list(out.glob("v*"))
    [line] = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len(line["prompts"]) == 2 and len(line["chunks"]) == 2
    assert cluster_processes(f"{ip}:{port}") == []
