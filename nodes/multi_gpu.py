"""StepVideo Sampler's ``gpus`` option: the local GPUs from a graph, without leaving ComfyUI.

With ``gpus`` N > 1 the sampler runs on N processes: this ComfyUI process (rank 0, on ComfyUI's own
device) and N-1 GPU worker processes (:class:`~stepvideo_core.parallel.workers.WorkerPool`), each on
another CUDA GPU, joined by a ``torch.distributed`` group on loopback; ``parallel`` says how the run
is split (Ulysses sequence parallel, CFG parallel, or auto).  The workers load the DiT once, from the
model handle's file or folder with its dtype, weight format and attention, and stay up between runs;
they stop when the model is freed (the handle garbage-collected: ComfyUI's cache dropped it, e.g.
"Free model and node cache"), when a run asks for another model or GPU count, and when ComfyUI exits.

Progress, previews and the interrupt stay rank 0's, as with one GPU: rank 0's interrupt poll is
agreed by every rank at the next step boundary, after which the workers wait for the next run.  A
worker that dies or fails makes the run fail with a message naming it, within a bounded time, and
the next run starts the workers again.

Without CUDA (``--cpu``) N > 1 starts CPU worker processes: a test mode (the e2e suite runs it on
gloo), slower than one process.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import weakref
from typing import Optional

import torch

from ..stepvideo_core.offload import SamplingInterrupted
from ..stepvideo_core.parallel import MODES, ParallelConfigError, ParallelLayout, token_split
from ..stepvideo_core.parallel.workers import (DecodeJob, LoadSettings, PoolSettings, SampleJob, WorkerError,
                                                WorkerPool)
from ..stepvideo_core.sampling import Placement, latent_shape
from . import comfy_bridge as bridge

log = logging.getLogger("StepVideo")

MAX_GPUS = 8
PARALLEL_CHOICES = MODES            # "auto", "ulysses", "cfg"


def devices_for(handle, gpus: int) -> list[torch.device]:
    """The device of each rank: ComfyUI's device first, then the other CUDA GPUs in order.

    On the CPU every rank is the CPU (the test mode).  Raises ValueError naming what would work for
    more GPUs than CUDA shows, or a device type that has no worker support.
    """
    device = torch.device(handle.device)
    if device.type == "cpu":
        return [torch.device("cpu")] * gpus
    if device.type != "cuda":
        raise ValueError(f"StepVideo Sampler: gpus {gpus} runs one worker process per CUDA GPU, but ComfyUI computes "
                         f"on {device.type}; set gpus to 1")
    if sys.platform == "win32":
        raise ValueError(f"StepVideo Sampler: gpus {gpus} needs NCCL, which PyTorch does not ship for Windows; "
                         f"set gpus to 1 (or run ComfyUI on Linux / WSL2)")
    count = torch.cuda.device_count()
    if gpus > count:
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = (f" (CUDA_VISIBLE_DEVICES={visible}; ComfyUI's --cuda-device shows it only one GPU)"
                if visible is not None else "")
        raise ValueError(f"StepVideo Sampler: gpus is {gpus} but {count} CUDA GPU{'s are' if count != 1 else ' is'} "
                         f"visible to ComfyUI{hint}; set gpus to {count} or fewer")
    first = device.index if device.index is not None else torch.cuda.current_device()
    others = [i for i in range(count) if i != first]
    return [torch.device("cuda", first)] + [torch.device("cuda", i) for i in others[:gpus - 1]]


def check(handle, gpus: int, mode: str, guided: bool, width: int, height: int, frames: int) -> ParallelLayout:
    """The layout of a run with ``gpus`` ranks, or a clear error before anything starts.

    ValueError for a bad ``gpus`` or more GPUs than present (:func:`devices_for`);
    :class:`~stepvideo_core.parallel.ParallelConfigError` when the heads do not split over the
    ranks, CFG parallel is asked for an unguided run, or the video has fewer tokens than ranks.
    """
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        raise ValueError(f"StepVideo Sampler: gpus must be an integer from 1 to {MAX_GPUS}, got {gpus!r}")
    if mode not in PARALLEL_CHOICES:
        raise ValueError(f"StepVideo Sampler: parallel must be one of {list(PARALLEL_CHOICES)}, got {mode!r}")
    if gpus == 1:
        return ParallelLayout(world=1, sp=1, cfg=1)  # this process alone: nothing to check
    devices_for(handle, gpus)
    config = handle.config
    try:
        layout = ParallelLayout.choose(mode, gpus, config.num_attention_heads, guided)
        _, latent_frames, _, h, w = latent_shape(width, height, frames, 1, config.in_channels)
        patch = int(getattr(config, "patch_size", 1) or 1)
        token_split(latent_frames * (h // patch) * (w // patch), layout.sp)
    except ParallelConfigError as exc:
        raise ParallelConfigError(f"StepVideo Sampler: gpus {gpus}, parallel {mode}: {exc}") from None
    return layout


# --------------------------------------------------------------------------- the pool of this ComfyUI


@dataclasses.dataclass
class _Active:
    key: tuple
    pool: WorkerPool
    finalizer: Optional[weakref.finalize] = None


_LOCK = threading.RLock()
_ACTIVE: Optional[_Active] = None


def _key(handle, gpus: int) -> tuple:
    """What the workers' loaded copies depend on (the attention backend and LoRA adapters travel with each run)."""
    return (id(handle.transformer), str(handle.source), str(handle.dtype), handle.weight_format,
            _weights_on(handle), gpus, tuple(str(d) for d in devices_for(handle, gpus)))


def _weights_on(handle) -> str:
    """Where a worker keeps its copy of the weights: as the host does (RAM, or the GPU with --gpu-only)."""
    return "device" if torch.device(handle.offload_device) == torch.device(handle.device) else "cpu"


def active_pool() -> Optional[WorkerPool]:
    """The running pool, if any (for tests and diagnostics; waits for a shutdown under way)."""
    with _LOCK:
        return _ACTIVE.pool if _ACTIVE is not None else None


def release(reason: str = "") -> None:
    """Stop the running workers (no-op without any)."""
    global _ACTIVE
    with _LOCK:
        active = _ACTIVE
        if active is None:
            return
        if active.finalizer is not None:
            active.finalizer.detach()
        if active.pool.healthy():
            log.info("StepVideo: stopping the GPU workers%s", f" ({reason})" if reason else "")
        try:
            active.pool.shutdown()
        finally:
            _ACTIVE = None


def _model_freed(key: tuple) -> None:
    """The handle's transformer was garbage-collected: stop its workers (in a thread: GC may run anywhere)."""

    def stop():
        with _LOCK:
            if _ACTIVE is not None and _ACTIVE.key == key:
                release("the model was freed")

    threading.Thread(target=stop, name="StepVideo worker shutdown", daemon=True).start()


def ensure_pool(handle, gpus: int) -> WorkerPool:
    """The pool for ``handle`` on ``gpus`` ranks: the running one, or (another model, GPU count, or a
    torn-down pool) a new one, after stopping the old."""
    global _ACTIVE
    key = _key(handle, gpus)
    with _LOCK:
        if _ACTIVE is not None and _ACTIVE.key == key and _ACTIVE.pool.healthy():
            return _ACTIVE.pool
        if _ACTIVE is not None:
            release("another model or GPU count" if _ACTIVE.key != key else "restarting after a failure")
        devices = devices_for(handle, gpus)
        if devices[0].type == "cpu":
            log.warning("StepVideo: gpus %d on the CPU starts %d CPU worker process(es): a test mode, slower than "
                        "one process", gpus, gpus - 1)
        load = LoadSettings(dtype=handle.dtype, weight_format=handle.weight_format, attention=handle.attention,
                            weights_on=_weights_on(handle))
        pool = WorkerPool(PoolSettings.from_env()).start(handle.source, load, gpus, lambda rank: devices[rank])
        finalizer = weakref.finalize(handle.transformer, _model_freed, key)
        finalizer.atexit = False  # at exit the pool's own atexit hook stops the workers
        _ACTIVE = _Active(key, pool, finalizer)
        return pool


class Runner:
    """A stand-in for :func:`stepvideo_core.sampling.sample` (same call) that runs on the GPU workers.

    ``description`` says, after a run, how it was split and where the workers are.
    """

    def __init__(self, handle, gpus: int, mode: str, layout: ParallelLayout):
        self.handle, self.gpus, self.mode, self.layout = handle, gpus, mode, layout  # layout: how check() split it
        self.description = ""

    def __call__(self, transformer, positive, negative=None, *, settings, placement=Placement(), on_step=None,
                 should_stop=None, stats=None, **options):
        handle = self.handle
        shared = dataclasses.replace(placement, device=None, cuda_api=None, kept=None, parallel=None)
        job = SampleJob(positive=positive, negative=negative, settings=settings, placement=shared, options=options,
                        mode=self.mode, attention=handle.attention, adapters=tuple(handle.adapters),
                        compile=getattr(handle, "compile", "off"))
        pool = ensure_pool(handle, self.gpus)
        caught = []

        def progress(i, n, latents):
            if on_step is None or caught:
                return
            try:
                on_step(i, n, latents)
            except BaseException as exc:  # ComfyUI's progress bar raises its interrupt (a BaseException): stop
                # with every rank at the next step instead of leaving the others in a collective
                if not bridge.is_interrupt(exc):
                    raise
                caught.append(exc)

        def stop() -> bool:
            return bool(caught) or bool(should_stop is not None and should_stop())

        try:
            latents = pool.run_job(job, transformer, placement.device, on_step=progress, should_stop=stop,
                                      cuda_api=placement.cuda_api, stats=stats, wrapped=True)
        except SamplingInterrupted:
            if caught:
                raise caught[0] from None
            raise
        self.description = pool.describe()
        return latents


def decode_on_workers(vae_handle, latents: torch.Tensor, *, tile: Optional[int], overlap: int,
                      on_chunk=None) -> Optional[torch.Tensor]:
    """The VAE decode of ``latents`` [B, F, C, h, w] shared with the running GPU workers, or None.

    Exists so that a graph whose StepVideo Sampler runs with ``gpus`` > 1 also decodes on those GPUs:
    this process decodes its share of the 3-latent chunks with ``vae_handle``'s VAE (already on its
    device), each worker its share with its own copy (loaded from the same file on its first decode);
    the video [B, T, 3, H, W] in [-1, 1] comes back on the CPU, equal to the one-GPU decode.  None,
    for the caller to decode alone, when no workers are running, when the VAE does not compute on the
    workers' rank-0 GPU, or when a worker fails (logged; the workers start again on the sampler's
    next run).
    """
    with _LOCK:
        pool = _ACTIVE.pool if _ACTIVE is not None else None
    if pool is None or not pool.healthy() or pool.world < 2:
        return None
    vae = vae_handle.vae
    if torch.device(vae.device) != pool.devices[0]:
        log.info("StepVideo VAE decode: the VAE computes on %s, the GPU workers' rank 0 on %s: decoding here alone",
                 vae.device, pool.devices[0])
        return None
    job = DecodeJob(latents=latents.cpu(), vae_source=str(vae_handle.source), dtype=vae_handle.dtype, tile=tile,
                    overlap=overlap)
    try:
        video = pool.run_job(job, vae, vae.device, on_step=on_chunk)
    except WorkerError as exc:
        log.warning("StepVideo VAE decode on the GPU workers failed (%s); decoding here alone", exc)
        return None
    log.info("StepVideo VAE decode: shared with the GPU workers (%s)", pool.describe())
    return video.cpu()


def runner(handle, gpus: int, mode: str, guided: bool, width: int, height: int, frames: int) -> Optional[Runner]:
    """None for one GPU; else a checked :class:`Runner` (errors as :func:`check`)."""
    layout = check(handle, gpus, mode, guided, width, height, frames)
    return Runner(handle, gpus, mode, layout) if gpus > 1 else None
