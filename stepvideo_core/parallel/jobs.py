"""What the host (rank 0) and its GPU workers share: settings, errors, jobs and the pickles that carry them.

Split from :mod:`.workers` (the host's pool) and :mod:`.worker` (the worker process): both sides
import this module, neither imports the other's.
"""


from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import operator
import os
import pickle
import types
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..sampling.settings import Placement, SamplingSettings
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
_RUNTIME_CORE = __name__.rsplit(".parallel.jobs", 1)[0]
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


# --------------------------------------------------------------------------- what a rank runs


@dataclasses.dataclass
class RankRun:
    """What a job sees on one rank: the rank's model, device, callbacks and parallel contexts.

    Rank 0 passes the host's callbacks (progress, interrupt poll, CUDA API, stats); workers pass
    none.  ``wrapped``: the caller already applied the run's LoRA adapters and compile choice around
    the call (the ComfyUI node does, on rank 0), so the job must not apply them again.  :meth:`context`
    builds the :class:`~stepvideo_core.parallel.ParallelContext` of a layout once per pool (every rank
    calls it in the same job order, as ``new_group`` requires).  ``kept``: what jobs keep on this rank
    from one run to the next, for as long as the pool lives (a worker's VAE, :class:`DecodeJob`).
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
    kept: dict = dataclasses.field(default_factory=dict)

    def context(self, layout: ParallelLayout) -> ParallelContext:
        found = self.contexts.get(layout)
        if found is None:
            found = self.contexts[layout] = ParallelContext.create(layout, self.device)
        return found


_SAMPLE_OWN = ("model", "positive", "negative", "settings", "placement", "on_step", "should_stop", "stats")
_PLACEMENT_OWN = ("device", "cuda_api", "kept", "parallel")  # a rank's own: its device, CUDA calls and context


@dataclasses.dataclass
class SampleJob:
    """One :func:`~stepvideo_core.sampling.sample` call, run by every rank with its own ParallelContext.

    * ``positive`` / ``negative``: the conditioning dicts (CPU tensors; pickled to the workers);
    * ``settings``: the run's :class:`~stepvideo_core.sampling.SamplingSettings`, the same on every rank;
    * ``placement``: the :class:`~stepvideo_core.sampling.Placement` every rank shares (``blocks_on_device``,
      ``batch_cfg``, ``streamer_mode``) -- not the device, CUDA calls, kept weights or parallel context,
      which are each rank's own;
    * ``options``: the rest of ``sample``'s keyword arguments (``condition``, ``cache``, ``noise``), the
      same on every rank -- not the callbacks or stats, which are each rank's own;
    * ``mode``: the parallel mode ("auto", "ulysses", "cfg"; see :meth:`ParallelLayout.choose`);
    * ``attention``: the attention backend each rank sets on its model first (None: leave it);
    * ``adapters``: LoRA entries each rank attaches for the run, and ``compile`` the
      :func:`~stepvideo_core.compile.compiled_blocks` choice each rank runs its blocks with (not on a
      rank whose caller wrapped the call in its own, :attr:`RankRun.wrapped`).
    """

    positive: Mapping
    negative: Optional[Mapping]
    settings: SamplingSettings
    placement: Placement = Placement()
    options: dict = dataclasses.field(default_factory=dict)
    mode: str = "auto"
    attention: Optional[str] = None
    adapters: tuple = ()
    compile: str = "off"

    def __post_init__(self):
        own = sorted({*(set(self.options) & set(_SAMPLE_OWN)),
                      *(name for name in _PLACEMENT_OWN if getattr(self.placement, name) is not None)})
        if own:
            raise ValueError(f"SampleJob must not set {own}: each rank passes its own")

    @property
    def guided(self) -> bool:
        return self.settings.guided

    def layout(self, world: int, model) -> ParallelLayout:
        """How ``world`` ranks split this run of the DiT ``model`` (ParallelConfigError for one that cannot run)."""
        return ParallelLayout.choose(self.mode, world, model.config.num_attention_heads, self.guided)

    def run(self, rank: RankRun) -> torch.Tensor:
        from ..compile import compiled_blocks
        from ..lora.apply import attached
        from ..sampling import sampler as core

        model = rank.model
        ctx = rank.context(self.layout(rank.world, model))
        if self.attention is not None:
            model.attention_backend = self.attention
        adapters = compiled = nullcontext()
        if self.adapters and not rank.wrapped:
            adapters = attached(model, self.adapters, blocks_on_device=self.placement.blocks_on_device)
        if self.compile != "off" and not rank.wrapped:
            compiled = compiled_blocks(model, self.compile, device=rank.device)
        # CFG parallel: each rank computes one half of the batched call (batch 1 per rank)
        placement = dataclasses.replace(self.placement, device=rank.device, cuda_api=rank.cuda_api, parallel=ctx,
                                        batch_cfg=self.placement.batch_cfg or ctx.layout.cfg > 1)
        with adapters, compiled:
            return core.sample(model, self.positive, self.negative, settings=self.settings, placement=placement,
                               on_step=rank.on_step, should_stop=rank.should_stop, stats=rank.stats, **self.options)


@dataclasses.dataclass
class DecodeJob:
    """One VAE decode of ``latents`` [B, F, C, h, w] (CPU) with its 3-latent chunks shared among every rank.

    Rank 0 decodes with the VAE it is given (the host's, already on its device); a worker loads the VAE
    from ``vae_source`` in ``dtype`` on its first decode, keeps it in RAM for the next ones
    (:attr:`RankRun.kept`) and has it on its GPU only while decoding.  ``tile`` / ``overlap``: as
    :meth:`~stepvideo_core.vae.StepVideoVAE.decode`.  Every rank returns the whole video
    [B, T, 3, H, W] in [-1, 1] on its device (:func:`~stepvideo_core.parallel.vae.decode_split`: the
    one-process decode bit for bit in fp32).  ``RankRun.on_step`` is called as ``on_chunk(done, total)``
    for rank 0's own chunks.  Not stoppable midway: a rank leaving the decode would leave the others
    waiting in its gather (chunks take seconds).
    """

    latents: torch.Tensor
    vae_source: str
    dtype: torch.dtype
    tile: Optional[int] = None
    overlap: int = 8

    def layout(self, world: int, model) -> ParallelLayout:
        """Every rank takes a share of the chunks (one group of all ranks)."""
        return ParallelLayout(world=world, sp=world, cfg=1)

    def run(self, rank: RankRun) -> torch.Tensor:
        ctx = rank.context(self.layout(rank.world, rank.model))
        if rank.rank == 0:
            return self._decode(rank.model, ctx, rank.on_step)
        vae = self._worker_vae(rank)
        vae.to(rank.device)
        try:
            return self._decode(vae, ctx, None)
        finally:
            vae.to("cpu")
            if rank.device.type == "cuda":
                torch.cuda.empty_cache()

    def _decode(self, vae, ctx: ParallelContext, on_chunk) -> torch.Tensor:
        from .vae import decode_split

        return decode_split(vae, self.latents.to(vae.device), group=ctx.sp_group, on_chunk=on_chunk,
                            tile=self.tile, overlap=self.overlap)

    def _worker_vae(self, rank: RankRun):
        """This worker's VAE for ``vae_source`` in ``dtype``: loaded into RAM once, the previous one dropped."""
        key = ("vae", str(self.vae_source), str(self.dtype))
        vae = rank.kept.get(key)
        if vae is None:
            from ..vae.loader import load_vae

            for old in [k for k in rank.kept if k[0] == "vae"]:
                del rank.kept[old]
            vae = rank.kept[key] = load_vae(self.vae_source, dtype=self.dtype, device="cpu")
        return vae
