"""Run a function on N local processes joined by a gloo process group (what torchrun does, in a test).

Not a test module: the functions the ranks run must live in an importable module (the ranks are
spawned interpreters), e.g. this one or ``tests.core.parallel.rank_jobs``.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(target, rank, world, port, queue, args, timeout_s):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = target(rank, world, *args)
        buffer = io.BytesIO()  # plain bytes: a tensor sent as shared memory dies with this process
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target, world: int, *args, timeout_s: float = 120.0) -> list:
    """``target(rank, world, *args)`` on ``world`` spawned processes; returns their results by rank.

    Raises AssertionError with the failing ranks' tracebacks, or when a rank does not answer in time.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(target, r, world, port, queue, args, timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, status, value = _get(queue, procs, timeout_s + 30)
            (results if status == "ok" else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
    return [torch.load(io.BytesIO(results[r]), weights_only=True) for r in range(world)]


def _get(queue, procs, timeout_s):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not queue.empty():
            return queue.get()
        if all(not p.is_alive() for p in procs) and queue.empty():
            raise AssertionError(f"every rank exited without answering (exit codes {[p.exitcode for p in procs]})")
        time.sleep(0.02)
    raise AssertionError(f"the ranks did not answer within {timeout_s:.0f} s")
