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
import gc
import importlib
import io
import logging
import operator
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
import types
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..offload.streamer import SamplingInterrupted
from .context import ParallelContext
from .layout import ParallelLayout

log = logging.getLogger("StepVideo")

ENV_TIMEOUT = "STEPVIDEO_PARALLEL_TIMEOUT"
ENV_START_TIMEOUT = "STEPVIDEO_PARALLEL_START_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_START_TIMEOUT_S = 1800.0

# What the workers import this module as: the pack's root on sys.path, "stepvideo_core" top-level.
# Inside ComfyUI the pack is imported under a mangled package name, which a spawned interpreter
# cannot import; pickles for the workers name "stepvideo_core" instead (see _Pickler).
CORE_NAME = "stepvideo_core"
_RUNTIME_CORE = __name__.rsplit(".parallel.workers", 1)[0]
PACK_ROOT = Path(__file__).resolve().parents[2]


class WorkerError(RuntimeError):
    """A GPU worker failed during a run (its exception's message follows); the pool was torn down."""


class WorkerDied(WorkerError):
    """A GPU worker process exited during a run; the pool was torn down."""


class WorkerTimeout(WorkerError):
    """The ranks did not meet within the collective timeout; the pool was torn down."""


class WorkerStartError(WorkerError):
    """The workers could not be started (a worker failed to load the model, died or was too slow)."""


# --------------------------------------------------------------------------- settings


def _seconds(env: Mapping, name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not str(raw).strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"${name} must be a positive number of seconds, got {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """Timeouts of a :class:`WorkerPool` (seconds).

    * ``collective_timeout_s``: the process group's timeout: the longest any rank waits for the others
      in one collective (and rank 0 waits for the workers' replies after finishing a run);
      ``$STEPVIDEO_PARALLEL_TIMEOUT``.
    * ``start_timeout_s``: how long the workers may take to start and load the DiT;
      ``$STEPVIDEO_PARALLEL_START_TIMEOUT``.
    * ``settle_timeout_s``: after rank 0 left a run early (interrupt, error), how long it waits for
      the workers' replies before tearing them down.
    * ``shutdown_timeout_s``: how long a clean shutdown waits for a worker to exit before killing it.
    * ``poll_s``: how often rank 0 looks for dead workers and replies while it waits.
    """

    collective_timeout_s: float = DEFAULT_TIMEOUT_S
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    settle_timeout_s: float = 30.0
    shutdown_timeout_s: float = 20.0
    poll_s: float = 0.05

    @classmethod
    def from_env(cls, env: Optional[Mapping] = None, **overrides) -> "PoolSettings":
        """The settings with the timeouts of ``env`` (default ``os.environ``), then ``overrides``."""
        env = os.environ if env is None else env
        values = dict(collective_timeout_s=_seconds(env, ENV_TIMEOUT, DEFAULT_TIMEOUT_S),
                      start_timeout_s=_seconds(env, ENV_START_TIMEOUT, DEFAULT_START_TIMEOUT_S))
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    """How every worker loads the DiT (:func:`~stepvideo_core.dit.loader.load_transformer`), as the host did.

    ``weights_on`` "cpu": the weights rest in the worker's RAM and the sampler moves (or streams)
    them to its device per run, as the host's; "device": loaded straight onto the worker's device.
    """

    dtype: torch.dtype = torch.float32
    weight_format: str = "auto"
    attention: str = "sdpa"
    weights_on: str = "cpu"

    def __post_init__(self):
        if self.weights_on not in ("cpu", "device"):
            raise ValueError(f"weights_on must be 'cpu' or 'device', got {self.weights_on!r}")


# --------------------------------------------------------------------------- pickles for the workers


class _ModuleByName:
    """Pickles as "import this module" (by its name in a worker)."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return importlib.import_module, (self.name,)


def _worker_name(module: str) -> str:
    if module == _RUNTIME_CORE or module.startswith(_RUNTIME_CORE + "."):
        return CORE_NAME + module[len(_RUNTIME_CORE):]
    return module


class _Pickler(pickle.Pickler):
    """Pickles the pack's classes and functions under the names a worker imports them by."""

    def reducer_override(self, obj):
        if _RUNTIME_CORE != CORE_NAME and isinstance(obj, (type, types.FunctionType)):
            module = getattr(obj, "__module__", None) or ""
            if _worker_name(module) != module:
                return operator.attrgetter(obj.__qualname__), (_ModuleByName(_worker_name(module)),)
        return NotImplemented


def dumps(obj) -> bytes:
    """``obj`` pickled for a worker (tensors by value, the pack's types by their worker-side names)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class _WorkerEntry:
    """The workers' process target: :func:`worker_main`, resolved by its worker-side module name."""

    def __reduce__(self):
        return operator.attrgetter("worker_main"), (_ModuleByName(CORE_NAME + ".parallel.workers"),)

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


# --------------------------------------------------------------------------- what a rank runs


@dataclasses.dataclass
class RankRun:
    """What a job sees on one rank: the rank's model, device, callbacks and parallel contexts.

    Rank 0 passes the host's callbacks (progress, interrupt poll, CUDA API, stats); workers pass
    none.  ``wrapped``: the caller already applied the run's LoRA adapters and compile choice around
    the call (the ComfyUI node does, on rank 0), so the job must not apply them again.  :meth:`context` builds the :class:`~stepvideo_core.parallel.ParallelContext` of a layout
    once per pool (every rank calls it in the same job order, as ``new_group`` requires).
    """

    rank: int
    world: int
    model: Any
    device: torch.device
    on_step: Optional[Callable] = None
    should_stop: Optional[Callable[[], bool]] = None
    cuda_api: Any = None
    stats: Optional[dict] = None
    contexts: dict = dataclasses.field(default_factory=dict)
    wrapped: bool = False

    def context(self, layout: ParallelLayout) -> ParallelContext:
        found = self.contexts.get(layout)
        if found is None:
            found = self.contexts[layout] = ParallelContext.create(layout, self.device)
        return found


_SAMPLE_OWN = ("model", "positive", "negative", "device", "on_step", "should_stop", "cuda_api", "stats", "parallel",
               "kept")


@dataclasses.dataclass
class SampleJob:
    """One :func:`~stepvideo_core.sampling.sample` call, run by every rank with its own ParallelContext.

    * ``positive`` / ``negative``: the conditioning dicts (CPU tensors; pickled to the workers);
    * ``options``: the rest of ``sample``'s keyword arguments (size, steps, cfg, shift, seed,
      ``blocks_on_device``, ``batch_cfg``, ``cache``, ``condition``, ``motion_score``, ...), the same
      on every rank -- not the model, device or callbacks, which are each rank's own;
    * ``mode``: the parallel mode ("auto", "ulysses", "cfg"; see :meth:`ParallelLayout.choose`);
    * ``attention``: the attention backend each rank sets on its model first (None: leave it);
    * ``adapters``: LoRA entries each rank attaches for the run, and ``compile`` the
      :func:`~stepvideo_core.compile.compiled_blocks` choice each rank runs its blocks with (not on a
      rank whose caller wrapped the call in its own, :attr:`RankRun.wrapped`).
    """

    positive: Mapping
    negative: Optional[Mapping] = None
    options: dict = dataclasses.field(default_factory=dict)
    mode: str = "auto"
    attention: Optional[str] = None
    adapters: tuple = ()
    compile: str = "off"

    def __post_init__(self):
        own = sorted(set(self.options) & set(_SAMPLE_OWN))
        if own:
            raise ValueError(f"SampleJob options must not set {own}: each rank passes its own")

    @property
    def guided(self) -> bool:
        return float(self.options.get("cfg", 1.0)) > 1.0

    def layout(self, world: int, heads: int) -> ParallelLayout:
        """How ``world`` ranks split this run (raises ParallelConfigError for a layout that cannot run)."""
        return ParallelLayout.choose(self.mode, world, heads, self.guided)

    def run(self, rank: RankRun) -> torch.Tensor:
        from ..compile import compiled_blocks
        from ..lora.apply import attached
        from ..sampling import sampler as core

        model = rank.model
        ctx = rank.context(self.layout(rank.world, model.config.num_attention_heads))
        if self.attention is not None:
            model.attention_backend = self.attention
        adapters = compiled = nullcontext()
        if self.adapters and not rank.wrapped:
            adapters = attached(model, self.adapters, blocks_on_device=self.options.get("blocks_on_device"))
        if self.compile != "off" and not rank.wrapped:
            compiled = compiled_blocks(model, self.compile, device=rank.device)
        common = dict(self.options, device=rank.device, on_step=rank.on_step, cuda_api=rank.cuda_api,
                      stats=rank.stats)
        if ctx.layout.cfg > 1:  # each rank computes one half of the batched call: batch 1 per rank
            common["batch_cfg"] = True
        with adapters, compiled:
            return core.sample(model, self.positive, self.negative, parallel=ctx, should_stop=rank.should_stop,
                               **common)


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
        while True:
            message = _wait_message(jobs, parent)
            if message[0] != "run":
                break
            _, job_id, job_blob = message
            job = pickle.loads(job_blob)
            try:
                result = job.run(RankRun(rank, world, model, device, contexts=contexts))
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
    each has loaded the DiT and joined; ``pool.run_sample(job, model)`` runs a :class:`SampleJob` (or any
    object with ``layout(world, heads)`` and ``run(RankRun)``) on every rank and returns rank 0's result;
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
            self._contexts, self.last_layout, self.last_replies = {}, None, {}
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
    def run_sample(self, job, model, device: Union[str, torch.device, None] = None, *,
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
            layout = job.layout(self.world, model.config.num_attention_heads)
            self.last_layout = layout
            self._job_id += 1
            blob = dumps(job)
            watch = _RunWatch(self, self._job_id)
            watch.start()
            for w in self._workers:
                w.jobs.put(("run", self._job_id, blob))
            rank = RankRun(0, self.world, model, torch.device(device) if device is not None else self.devices[0],
                           on_step=on_step, should_stop=should_stop, cuda_api=cuda_api, stats=stats,
                           contexts=self._contexts, wrapped=wrapped)
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
            self._contexts = {}
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
