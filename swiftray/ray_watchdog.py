"""Stops the local Ray cluster a swiftray driver started when the driver ends, however it ends.

A driver killed with SIGKILL leaves Ray's agents (dashboard agent, runtime-env agent) running for
about a minute (measured with Ray 2.60), and a driver stuck in its exit handlers leaves all of
Ray. `cluster.init_ray` starts this script in its own session (Ctrl-C in the terminal does not
reach it), with a pipe on its stdin that only the driver holds. The script notes the driver's
descendant processes every second; when the pipe closes or the driver's pid is gone, it sends
SIGTERM to those still running, and SIGKILL to any left a few seconds later, then exits.

It imports only the standard library and psutil (a Ray dependency): it starts fast and holds
little memory. Usage: python ray_watchdog.py DRIVER_PID
"""

from __future__ import annotations

import os
import select
import sys

import psutil

POLL_S = 1.0
GRACE_S = 3.0


def descendants(roots: list[psutil.Process]) -> dict[int, psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for proc in root.children(recursive=True):
                found[proc.pid] = proc
        except psutil.Error:  # gone meanwhile
            pass
    return found


def driver_alive(driver: psutil.Process) -> bool:
    try:
        return driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver_pid: int) -> None:
    driver = psutil.Process(driver_pid)
    me = os.getpid()
    known: dict[int, psutil.Process] = {}
    while True:
        known.update(descendants([driver]))
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):  # EOF: the driver's end is closed
            break
        if not driver_alive(driver):
            break
    # Processes started since the last look are children of ones we know (raylet's workers).
    known.update(descendants(list(known.values())))
    alive = [p for pid, p in known.items() if pid != me and p.is_running()]  # is_running: same create time
    for proc in alive:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=GRACE_S)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
