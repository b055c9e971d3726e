"""A GPU worker process of a :class:`~.workers.WorkerPool`: load the DiT once, then run jobs until told to stop.

Runs in a spawned interpreter that imports the pack's core as ``stepvideo_core`` (see :mod:`.jobs`).
"""


from __future__ import annotations

import datetime
import gc
import logging
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Optional

import torch
import torch.distributed as dist

from ..offload.streamer import SamplingInterrupted

from .jobs import RankRun

log = logging.getLogger("StepVideo")


# --------------------------------------------------------------------------- the workers


def _loopback_interface() -> Optional[str]:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return None


def _loopback_env() -> None:
    """Make gloo and NCCL use the loopback interface (unless the user chose an interface)."""
    name = _loopback_interface()
    if name:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
    # a failed NCCL collective raises in the calling thread instead of tearing the host process down
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def _format_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}"


def fingerprint(result) -> Optional[tuple]:
    """(shape, sum, sum of |x|) of a tensor result in float64: what a worker reports of its result, so that
    rank 0 can tell that every rank ended with the same latents (None for anything else)."""
    if not isinstance(result, torch.Tensor):
        return None
    values = result.detach().double()
    return tuple(result.shape), float(values.sum()), float(values.abs().sum())


def _wait_message(jobs, parent) -> tuple:
    """The next message for this worker; ("stop",) when the host is gone."""
    while True:
        try:
            return jobs.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return ("stop",)


def worker_main(rank: int, world: int, port: int, backend: str, device: str, source: str, blob: bytes,
                jobs, replies) -> None:
    """A worker's life: load the DiT, join the process group, run jobs until told to stop.

    Replies ``(kind, rank, job_id, payload)`` on ``replies``: "ready" (pid, device, load time) once the
    model is loaded, then per job "done", "interrupted" (the ranks agreed to stop; the worker waits
    for the next job) or "error" (the formatted exception; the worker then exits with code 1, which
    makes the other ranks' collectives fail instead of wait).
    """
    import multiprocessing

    logging.basicConfig(level=logging.INFO, format=f"[StepVideo worker {rank}] %(levelname)s %(message)s")
    parent = multiprocessing.parent_process()
    job_id = None
    try:
        load, settings, threads = pickle.loads(blob)
        device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from ..dit.loader import load_transformer

        start = time.perf_counter()
        home = device if load.weights_on == "device" else torch.device("cpu")
        model = load_transformer(source, dtype=load.dtype, device=home, attention=load.attention,
                                 weight_format=load.weight_format)
        seconds = time.perf_counter() - start
        log.info("loaded %s onto %s in %.1f s (pid %d)", source, home, seconds, os.getpid())
        replies.put(("ready", rank, None, {"pid": os.getpid(), "device": str(device), "seconds": seconds}))
        message = _wait_message(jobs, parent)
        if message[0] != "join":
            return
        timeout = datetime.timedelta(seconds=settings.collective_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        dist.all_reduce(torch.zeros(1))  # every rank is in (rank 0 waits for this before it returns from start)
        contexts: dict = {}
        kept: dict = {}  # what jobs keep on this rank between runs (a VAE loaded for decodes)
        while True:
            message = _wait_message(jobs, parent)
            if message[0] != "run":
                break
            _, job_id, job_blob = message
            job = pickle.loads(job_blob)
            try:
                result = job.run(RankRun(rank, world, model, device, contexts=contexts, kept=kept))
            except SamplingInterrupted:
                replies.put(("interrupted", rank, job_id, None))
            else:
                replies.put(("done", rank, job_id, fingerprint(result)))
                del result
            job_id = None
            del job
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then this process ends
        replies.put(("error", rank, job_id, _format_exception(exc)))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
