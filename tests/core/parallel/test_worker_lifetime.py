"""GPU workers do not outlive their host: a host that exits stops them (atexit), a host that is killed
(SIGKILL: no atexit) leaves workers that notice and exit by themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stepvideo_core.tiny import write_tiny_dit

REPO_ROOT = Path(__file__).resolve().parents[3]

HOST = textwrap.dedent("""
    import logging, sys, time, torch
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from stepvideo_core.parallel.workers import LoadSettings, PoolSettings, WorkerPool
    torch.set_num_threads(1)
    pool = WorkerPool(PoolSettings(collective_timeout_s=60)).start(sys.argv[1], LoadSettings(), 2, lambda r: "cpu")
    print("PID", pool.pids[1], flush=True)
    if sys.argv[2] == "wait":
        time.sleep(600)
    # "exit": leave without shutting the pool down: the atexit hook must
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"   # a zombie has exited
    except FileNotFoundError:
        return False


def start_host(dit: str, mode: str, tmp_path):
    script = tmp_path / "host.py"
    script.write_text(HOST)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, str(script), dit, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("PID "):
            return proc, int(line.split()[1]), lines
    proc.wait(timeout=30)
    pytest.fail("the host did not start its worker:\n" + "".join(lines))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return str(write_tiny_dit(tmp_path_factory.mktemp("dit")))


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_a_host_that_exits_stops_its_workers(dit, tmp_path):
    proc, pid, lines = start_host(dit, "exit", tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "StepVideo: GPU workers stopped (rank 1 pid" in out  # the atexit hook, politely
    assert wait_gone(pid, 10)


def test_workers_of_a_killed_host_exit_by_themselves(dit, tmp_path):
    proc, pid, _ = start_host(dit, "wait", tmp_path)
    assert alive(pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert wait_gone(pid, 20), "the worker outlived its killed host"
