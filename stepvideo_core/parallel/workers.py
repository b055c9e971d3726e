"""Local GPU workers for a host process that is rank 0 (ComfyUI): one process per extra GPU.

:class:`WorkerPool` starts ``gpus - 1`` worker processes (``torch.multiprocessing``, spawn), each of
which loads the DiT once from the same file or folder as the host's model, with the same dtype,
weight format and attention, onto its own device (``cuda:i``, or the CPU in the test mode), and then
waits for work.  The host and the workers form one ``torch.distributed`` process group on loopback
(gloo on CPUs; ``cpu:gloo,cuda:nccl`` on GPUs, so that small CPU collectives such as the agreement
to stop also work there); the host is rank 0.  Every run is a job: rank 0 puts it on each worker's
job queue and runs it itself, and every rank calls :func:`~stepvideo_core.sampling.sample` with the
same arguments and its :class:`~stepvideo_core.parallel.ParallelContext`.  Only rank 0 reports
progress and previews and polls for an interrupt; the ranks agree on stopping at step boundaries
(:meth:`~stepvideo_core.parallel.ParallelContext.agree_to_stop`), after which the workers go back to
waiting and the pool stays up.

Control messages travel over ``torch.multiprocessing`` queues (a job queue per worker, one reply
queue); a job's tensors travel pickled inside its message, the video's tensors over the process group.
No sockets or protocol of our own: the rendezvous is a ``torch.distributed.TCPStore`` whose
listening socket is bound to 127.0.0.1, gloo and NCCL are told the loopback interface.

Failures, and why each is bounded:

* a worker that dies (or raises) during a run is seen by a watcher thread of rank 0 within
  :attr:`PoolSettings.poll_s`; it kills the other workers (and aborts an NCCL group), so the
  collective rank 0 is waiting in fails at once instead of at its timeout; rank 0 then raises
  :class:`WorkerDied` ("StepVideo: GPU worker 1 (pid ...) died (exit code -9) during sampling") or
  :class:`WorkerError` (the worker's exception), and the pool is torn down: the next run starts fresh;
* a worker that hangs makes rank 0's next collective time out after
  :attr:`PoolSettings.collective_timeout_s` (default 10 min, ``$STEPVIDEO_PARALLEL_TIMEOUT``):
  :class:`WorkerTimeout`, pool torn down;
* a worker that cannot load the model fails :meth:`WorkerPool.start` with :class:`WorkerStartError`
  carrying its message (``$STEPVIDEO_PARALLEL_START_TIMEOUT`` bounds the loading, default 30 min);
* workers whose host dies notice it (their parent's sentinel) and exit; :func:`shutdown_all` runs at
  interpreter exit (``atexit``).

Only one pool can hold the process's default process group at a time.
"""


from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import operator
import os
import queue
import socket
import sys
import threading
import time
import types
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from ..offload.streamer import SamplingInterrupted
from .jobs import (CORE_NAME, ENV_START_TIMEOUT, ENV_TIMEOUT, PACK_ROOT, DecodeJob,  # noqa: F401 - re-exported:
                   LoadSettings, PoolSettings, RankRun, SampleJob, WorkerDied, WorkerError, WorkerStartError,  # callers import
                   WorkerTimeout, _ModuleByName, dumps)  # the settings, jobs and errors from here
from .layout import ParallelLayout
from .worker import _loopback_env, fingerprint, worker_main  # noqa: F401 - worker_main: the spawn target

log = logging.getLogger("StepVideo")


# --------------------------------------------------------------------------- starting workers


class _WorkerEntry:
    """The workers' process target: :func:`worker_main`, resolved by its worker-side module name."""

    def __reduce__(self):
        return operator.attrgetter("worker_main"), (_ModuleByName(CORE_NAME + ".parallel.worker"),)

    def __call__(self, *args):  # only ever called after unpickling, in a worker
        return worker_main(*args)


_SPAWN_LOCK = threading.Lock()


@contextmanager
def _spawning():
    """While starting workers: the pack's root first on sys.path (the workers import ``stepvideo_core``
    from the same files) and no ``__main__`` for spawn to re-run in the workers (a host such as
    ComfyUI's main.py would otherwise start its whole import chain, and CUDA, in every worker)."""
    with _SPAWN_LOCK:
        root = str(PACK_ROOT)
        sys.path.insert(0, root)
        main = sys.modules.get("__main__")
        stub = types.ModuleType("__main__")
        stub.__spec__ = None
        sys.modules["__main__"] = stub
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main
            else:
                sys.modules.pop("__main__", None)
            try:
                sys.path.remove(root)
            except ValueError:
                pass


# --------------------------------------------------------------------------- rank 0


def _is_comm_error(exc: BaseException) -> bool:
    """True for what a failed or timed-out collective raises (gloo, NCCL, the store)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset", "Broken pipe", "Timed out",
        "timed out", "c10d", "ProcessGroup", "process group"))


def _is_timeout(exc: BaseException) -> bool:
    return "imed out" in str(exc) or isinstance(exc, getattr(dist, "DistTimeoutError", ()))


@dataclasses.dataclass
class _Worker:
    rank: int
    process: Any
    jobs: Any
    device: torch.device
    pid: Optional[int] = None

    def exitcode(self) -> Optional[int]:
        self.process.join(timeout=0)
        return self.process.exitcode


class _RunWatch(threading.Thread):
    """Rank 0's watcher during a run: collects the workers' replies and notices dead workers.

    On the first failure (a death, or an error reply) it kills the remaining workers and aborts an
    NCCL group, so that rank 0's pending collective fails now rather than at its timeout.
    """

    def __init__(self, pool: "WorkerPool", job_id: int):
        super().__init__(name=f"StepVideo worker watch {job_id}", daemon=True)
        self.pool, self.job_id = pool, job_id
        self.replies: dict = {}   # rank -> (kind, payload, time)
        self.deaths: dict = {}    # rank -> (exit code, time)
        self.cond = threading.Condition()
        self.halt = threading.Event()
        self.tripped = False

    def run(self):
        while not self.halt.is_set():
            self.poll()

    def poll(self):
        pool = self.pool
        try:
            kind, rank, job_id, payload = pool._replies.get(timeout=pool.settings.poll_s)
        except queue.Empty:
            pass
        except (OSError, EOFError, ValueError):  # the queue was closed by a teardown
            self.halt.wait(pool.settings.poll_s)
        else:
            if kind == "error" or job_id == self.job_id:
                with self.cond:
                    self.replies.setdefault(rank, (kind, payload, time.monotonic()))
        with self.cond:
            for w in pool._workers:
                if w.rank not in self.deaths and not w.process.is_alive():
                    self.deaths[w.rank] = (w.exitcode(), time.monotonic())
            failed = bool(self.deaths) or any(kind == "error" for kind, _, _ in self.replies.values())
            if failed and not self.tripped:
                self.tripped = True
                pool._kill_workers()
                pool._abort_group()
            self.cond.notify_all()

    def wait(self, predicate, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate() or self.tripped, timeout=timeout) and predicate()

    def all_replied(self) -> bool:
        return all(w.rank in self.replies for w in self.pool._workers)

    def failure_seen(self) -> bool:
        return self.tripped

    def stop(self):
        self.halt.set()
        if self is not threading.current_thread():
            self.join(timeout=5)

    def cause(self) -> Optional[tuple]:
        """("error"|"died", rank, text, exit code) of the first worker failure, or None."""
        events = [(t, "error", rank, payload, None) for rank, (kind, payload, t) in self.replies.items()
                  if kind == "error"]
        events += [(t, "died", rank, None, code) for rank, (code, t) in self.deaths.items()
                   if self.replies.get(rank, ("",))[0] != "error"]
        if not events:
            return None
        _, what, rank, text, code = min(events, key=lambda e: e[0])
        return what, rank, text, code


_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()
_ATEXIT = []


def shutdown_all() -> None:
    """Shut down every live pool (registered with ``atexit`` when the first pool starts); a pool still in a
    run (the host exits mid-run) has its workers killed instead of waiting for the run."""
    for pool in list(_POOLS):
        try:
            pool.shutdown(wait_for_run_s=2.0)
        except Exception:  # noqa: BLE001 - exiting
            log.exception("StepVideo: shutting down the GPU workers failed")


class WorkerPool:
    """``gpus - 1`` worker processes plus the calling process (rank 0) in one process group.

    ``pool.start(source, LoadSettings(...), gpus, device_for_rank)`` spawns the workers and waits until
    each has loaded the DiT and joined; ``pool.run_job(job, model)`` runs a :class:`SampleJob`, a
    :class:`DecodeJob` (or any object with ``layout(world, model)`` and ``run(RankRun)``) on every rank, rank 0
    with ``model`` (the host's DiT, or its VAE for a decode), and returns rank 0's result;
    ``pool.shutdown()`` stops them.  Thread-safe (one run at a time).
    """

    def __init__(self, settings: Optional[PoolSettings] = None):
        self.settings = settings or PoolSettings.from_env()
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._replies = None
        self._store = None
        self._contexts: dict = {}
        self._job_id = 0
        self._group = False          # this pool initialised the default process group
        self._backend = None
        self.world = 0
        self.devices: list[torch.device] = []
        self.source: Optional[str] = None
        self.load: Optional[LoadSettings] = None
        self.closed = True
        self.last_layout: Optional[ParallelLayout] = None
        self.last_replies: dict = {}
        self.last_fingerprints: dict = {}  # rank -> fingerprint() of its result in the last finished run
        self._known_pids: dict = {}   # rank -> pid of the last start's workers (kept for messages after a teardown)

    # ------------------------------------------------------------------ facts
    @property
    def pids(self) -> dict:
        """{rank: pid} of the workers."""
        return {w.rank: w.pid or w.process.pid for w in self._workers}

    def healthy(self) -> bool:
        """Started, not torn down, and every worker alive."""
        return not self.closed and all(w.process.is_alive() for w in self._workers)

    def describe(self) -> str:
        workers = ", ".join(f"rank {w.rank} pid {w.pid or w.process.pid} on {w.device}" for w in self._workers)
        layout = self.last_layout.describe() if self.last_layout is not None else f"{self.world} processes"
        return f"{layout}; rank 0 on {self.devices[0] if self.devices else '?'} (this process), workers: {workers}"

    # ------------------------------------------------------------------ start
    def start(self, model_source: Union[str, Path], load: LoadSettings, gpus: int,
              device_for_rank: Callable[[int], Union[str, torch.device]]) -> "WorkerPool":
        """Spawn ``gpus - 1`` workers (ranks 1..gpus-1 on ``device_for_rank(rank)``), each loading
        ``model_source`` with ``load``, and join them with this process as rank 0.

        Raises ValueError for ``gpus`` < 2, RuntimeError when this process already has a default
        process group, :class:`WorkerStartError` when a worker fails to load, dies or times out
        (every worker is then stopped).
        """
        import torch.multiprocessing as mp

        if not isinstance(gpus, int) or gpus < 2:
            raise ValueError(f"a worker pool needs at least 2 ranks (gpus >= 2), got {gpus!r}")
        with self._lock:
            if not self.closed:
                raise RuntimeError("this WorkerPool is already started")
            if dist.is_available() and dist.is_initialized():
                raise RuntimeError("torch.distributed is already initialised in this process (another worker pool, "
                                   "or started under torchrun): the GPU workers need their own process group")
            self.devices = [torch.device(device_for_rank(r)) for r in range(gpus)]
            types_ = {d.type for d in self.devices}
            if not types_ <= {"cpu", "cuda"}:
                raise ValueError(f"GPU workers run on CUDA GPUs or on the CPU, got devices {self.devices}")
            self._backend = "gloo" if types_ == {"cpu"} else "cpu:gloo,cuda:nccl"
            self.world, self.source, self.load = gpus, str(model_source), load
            self._known_pids = {}
            self._contexts, self._kept, self.last_layout, self.last_replies = {}, {}, None, {}
            _loopback_env()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            timeout = datetime.timedelta(seconds=self.settings.collective_timeout_s)
            self._store = dist.TCPStore("127.0.0.1", port, gpus, is_master=True, wait_for_workers=False,
                                        timeout=timeout, master_listen_fd=listener.detach())
            ctx = mp.get_context("spawn")
            self._replies = ctx.Queue()
            cpu_workers = sum(d.type == "cpu" for d in self.devices)
            threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0
            blob = dumps((load, self.settings, threads if self.devices[1].type == "cpu" else 0))
            self.closed = False
            if not _ATEXIT:
                atexit.register(shutdown_all)
                _ATEXIT.append(True)
            _POOLS.add(self)
            try:
                with _spawning():
                    for rank in range(1, gpus):
                        jobs = ctx.Queue()
                        proc = ctx.Process(target=_WorkerEntry(), name=f"StepVideo GPU worker {rank}", daemon=True,
                                           args=(rank, gpus, port, self._backend, str(self.devices[rank]),
                                                 self.source, blob, jobs, self._replies))
                        proc.start()
                        self._workers.append(_Worker(rank, proc, jobs, self.devices[rank], proc.pid))
                        self._known_pids[rank] = proc.pid
                self._await_ready()
                for w in self._workers:
                    w.jobs.put(("join",))
                dist.init_process_group(self._backend, store=self._store, rank=0, world_size=gpus, timeout=timeout)
                self._group = True
                dist.all_reduce(torch.zeros(1))  # returns once every worker finished joining
            except BaseException as exc:
                self._teardown()
                if isinstance(exc, WorkerStartError) or not isinstance(exc, Exception):
                    raise
                raise WorkerStartError(f"StepVideo: the GPU workers could not join the process group: "
                                       f"{type(exc).__name__}: {exc}") from exc
            log.info("StepVideo: %d GPU worker(s) ready: %s", gpus - 1,
                     ", ".join(f"rank {w.rank} pid {w.pid} on {w.device}" for w in self._workers))
            return self

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        ready: dict = {}
        while len(ready) < len(self._workers):
            try:
                kind, rank, _, payload = self._replies.get(timeout=self.settings.poll_s)
            except queue.Empty:
                pass
            else:
                worker = self._workers[rank - 1]
                if kind == "error":
                    log.error("StepVideo: GPU worker %d failed to start:\n%s", rank, payload)
                    first = str(payload).splitlines()[0] if payload else "unknown error"
                    raise WorkerStartError(f"StepVideo: GPU worker {rank} (pid {worker.pid}) could not start: "
                                           f"{first}")
                if kind == "ready":
                    ready[rank] = payload
                continue
            for w in self._workers:
                if not w.process.is_alive() and w.rank not in ready:
                    raise WorkerStartError(f"StepVideo: GPU worker {w.rank} (pid {w.pid}) died (exit code "
                                           f"{w.exitcode()}) while loading the model")
            if time.monotonic() > deadline:
                missing = [w.rank for w in self._workers if w.rank not in ready]
                raise WorkerStartError(f"StepVideo: GPU worker(s) {missing} did not load the model within "
                                       f"{self.settings.start_timeout_s:.0f} s (${ENV_START_TIMEOUT})")

    # ------------------------------------------------------------------ runs
    def run_job(self, job, model, device: Union[str, torch.device, None] = None, *,
                   on_step: Optional[Callable] = None, should_stop: Optional[Callable[[], bool]] = None,
                   cuda_api=None, stats: Optional[dict] = None, wrapped: bool = False):
        """Run ``job`` on every rank (this process with ``model`` on ``device``, default rank 0's) and
        return this rank's result (the latents: the same on every rank).  ``wrapped``: see :class:`RankRun`.

        The layout is checked first (ParallelConfigError, pool untouched).  An agreed interrupt
        re-raises :class:`SamplingInterrupted` with the pool kept; any other failure tears the pool
        down and raises :class:`WorkerDied`, :class:`WorkerError`, :class:`WorkerTimeout`, or rank 0's
        own exception.
        """
        with self._lock:
            if not self.healthy():
                dead = [(w.rank, w.pid, w.exitcode()) for w in self._workers if not w.process.is_alive()]
                self._teardown()
                if dead:
                    rank, pid, code = dead[0]
                    raise WorkerDied(f"StepVideo: GPU worker {rank} (pid {pid}) died (exit code {code}) while "
                                     f"waiting for work; the workers start again on the next run")
                raise RuntimeError("StepVideo: the GPU workers are not running (start the pool first)")
            layout = job.layout(self.world, model)
            self.last_layout = layout
            self._job_id += 1
            blob = dumps(job)
            watch = _RunWatch(self, self._job_id)
            watch.start()
            for w in self._workers:
                w.jobs.put(("run", self._job_id, blob))
            rank = RankRun(0, self.world, model, torch.device(device) if device is not None else self.devices[0],
                           on_step=on_step, should_stop=should_stop, cuda_api=cuda_api, stats=stats,
                           contexts=self._contexts, kept=self._kept, wrapped=wrapped)
            try:
                result = job.run(rank)
            except BaseException as exc:
                self._failed(watch, exc)
                raise  # _failed raises; not reached
            finished = watch.wait(watch.all_replied, self.settings.collective_timeout_s)
            watch.stop()
            self.last_replies = {r: kind for r, (kind, _, _) in watch.replies.items()}
            self.last_fingerprints = {0: fingerprint(result), **{
                r: payload for r, (kind, payload, _) in watch.replies.items() if kind == "done"}}
            if len(set(self.last_fingerprints.values())) > 1:
                log.warning("StepVideo: the ranks ended with different results (shape, sum, sum |x|): %s",
                            self.last_fingerprints)
            if not finished or any(kind != "done" for kind in self.last_replies.values()):
                problem = self._describe_cause(watch.cause()) or (
                    f"StepVideo: the GPU workers did not finish within {self.settings.collective_timeout_s:.0f} s "
                    f"(${ENV_TIMEOUT})")
                log.warning("%s after rank 0 had its result; stopping the workers (they start again on the next "
                            "run)", problem)
                self._teardown()
            return result

    def _failed(self, watch: _RunWatch, exc: BaseException) -> None:
        """Rank 0 left a run with ``exc``: keep the pool after an agreed interrupt, else tear it down and
        raise what explains the failure best."""
        settle = self.settings.settle_timeout_s
        if isinstance(exc, SamplingInterrupted):
            if watch.wait(lambda: watch.all_replied(), settle) and all(
                    kind == "interrupted" for kind, _, _ in watch.replies.values()):
                watch.stop()
                self.last_replies = {r: kind for r, (kind, _, _) in watch.replies.items()}
                raise exc
        elif _is_comm_error(exc):
            watch.wait(watch.failure_seen, min(settle, 5.0))  # the cause may be a reply in flight
        watch.stop()
        self.last_replies = {r: kind for r, (kind, _, _) in watch.replies.items()}
        cause = watch.cause()
        self._teardown()
        message = self._describe_cause(cause)
        if cause is not None and (cause[0] == "died" or _is_comm_error(exc) or isinstance(exc, SamplingInterrupted)):
            raise (WorkerDied if cause[0] == "died" else WorkerError)(message) from exc
        if _is_comm_error(exc):
            what = "timed out" if _is_timeout(exc) else "failed"
            raise WorkerTimeout(f"StepVideo: a collective between the GPU workers {what} "
                                f"(timeout {self.settings.collective_timeout_s:.0f} s, ${ENV_TIMEOUT}): {exc}; "
                                f"the workers were stopped and start again on the next run") from exc
        if isinstance(exc, SamplingInterrupted):
            raise WorkerTimeout(f"StepVideo: the GPU workers did not stop within {settle:.0f} s of the interrupt; "
                                f"they were stopped and start again on the next run") from exc
        log.warning("StepVideo: rank 0 left the run with %s: %s; the GPU workers were stopped (they start again on "
                    "the next run)", type(exc).__name__, exc)
        raise exc

    def _describe_cause(self, cause: Optional[tuple]) -> Optional[str]:
        if cause is None:
            return None
        what, rank, text, code = cause
        pid = self._known_pids.get(rank, "?")
        if what == "died":
            return (f"StepVideo: GPU worker {rank} (pid {pid}) died (exit code {code}) during sampling; the "
                    f"workers were stopped and start again on the next run")
        first = (text or "").splitlines()[0] if text else "unknown error"
        log.error("StepVideo: GPU worker %d failed:\n%s", rank, text)
        return f"StepVideo: GPU worker {rank} (pid {pid}) failed during sampling: {first}"

    # ------------------------------------------------------------------ stop
    def _kill_workers(self) -> None:
        for w in self._workers:
            if w.process.is_alive():
                try:
                    w.process.kill()
                except (OSError, ValueError):
                    pass

    def _abort_group(self) -> None:
        """Abort an NCCL group so that a blocked collective returns (gloo fails by itself once peers die)."""
        if self._group and self._backend != "gloo":
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                try:
                    abort()
                except Exception:  # noqa: BLE001 - best effort; the timeout still bounds the wait
                    log.exception("StepVideo: aborting the NCCL process group failed")

    def _teardown(self, polite: bool = False) -> None:
        """Stop every worker (asked first when ``polite``), leave the process group, drop the queues."""
        with self._lock:
            workers, self._workers = self._workers, []
            if polite:
                for w in workers:
                    try:
                        w.jobs.put(("stop",))
                    except (OSError, ValueError):
                        pass
            else:
                for w in workers:
                    if w.process.is_alive():
                        w.process.kill()
            if self._group and dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001 - the group may be broken already
                    log.debug("StepVideo: destroying the process group failed", exc_info=True)
            self._group = False
            deadline = time.monotonic() + (self.settings.shutdown_timeout_s if polite else 5.0)
            for w in workers:
                w.process.join(timeout=max(0.0, deadline - time.monotonic()))
                if w.process.is_alive():
                    log.warning("StepVideo: GPU worker %d (pid %s) did not exit; killing it", w.rank, w.pid)
                    w.process.kill()
                    w.process.join(timeout=5)
            for q in [w.jobs for w in workers] + ([self._replies] if self._replies is not None else []):
                q.cancel_join_thread()
                q.close()
            self._replies = None
            self._store = None
            self._contexts, self._kept = {}, {}
            self.closed = True
            _POOLS.discard(self)

    def shutdown(self, wait_for_run_s: Optional[float] = None) -> None:
        """Ask the workers to exit, wait for them (then kill what remains), leave the process group.

        A run in progress (in another thread) is waited for, at most ``wait_for_run_s`` seconds when given;
        after that the workers are killed without waiting for it.
        """
        if not self._lock.acquire(timeout=-1 if wait_for_run_s is None else wait_for_run_s):
            log.warning("StepVideo: a run is still using the GPU workers; killing them")
            self._kill_workers()
            return
        try:
            if self.closed:
                return
            pids = self.pids
            self._teardown(polite=True)
            log.info("StepVideo: GPU workers stopped (%s)", ", ".join(f"rank {r} pid {p}" for r, p in pids.items()))
        finally:
            self._lock.release()
