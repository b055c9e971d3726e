"""The two settings objects of :func:`~stepvideo_core.sampling.sample`: what a run makes, and where it runs.

:class:`SamplingSettings` is what the video is (size, steps, guidance, schedule shift, seed, TI2V motion
score): the same on every machine and every rank of a parallel run.  :class:`Placement` is how this
process computes it (device, block streaming, CFG batching, the host's CUDA calls, kept weights, the
parallel context): it changes where the memory goes and how long it takes, not the video beyond float
rounding.  Both are frozen dataclasses, so a caller derives a variant with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:  # annotations only: the sampler imports these modules itself
    from ..offload.kept import KeptWeights
    from ..offload.streamer import TorchCuda
    from ..parallel.context import ParallelContext


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What one sampling run makes.

    ``width`` / ``height``: multiples of 16; ``frames``: a multiple of 17 (every 17 frames are 3 latent
    frames); ``steps``: Euler steps; ``cfg``: the guidance scale (guidance runs when > 1); ``shift``: the
    time shift of the flow-matching schedule; ``seed``: of the noise, drawn on the CPU (the same video on
    every machine); ``motion_score``: Step-Video-TI2V only (None: T2V, or the default 5 on TI2V).  The
    values are checked where they are used (:func:`~stepvideo_core.sampling.sample`).
    """

    width: int
    height: int
    frames: int
    steps: int
    cfg: float
    shift: float
    seed: int = 0
    motion_score: Optional[float] = None

    @property
    def guided(self) -> bool:
        """True when classifier-free guidance runs (cfg > 1, as the official pipeline): two branches a step."""
        return self.cfg > 1.0


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where and how one sampling run computes; the defaults compute where the weights are, all resident.

    * ``device``: where the DiT computes (None: where its weights are).
    * ``blocks_on_device``: how many transformer blocks stay there, the others are streamed in per call
      (None: all of them).
    * ``batch_cfg``: the two guidance branches in one batch-2 call (official, bit-faithful) or in two
      batch-1 calls (half the activation memory; results differ by float rounding only).
    * ``streamer_mode`` / ``cuda_api``: passed to the :class:`~stepvideo_core.offload.streamer.BlockStreamer`
      (``cuda_api`` None: torch.cuda's own calls; a host such as ComfyUI passes one whose pinning stays
      within its pinned-memory budget).
    * ``kept``: a :class:`~stepvideo_core.offload.kept.KeptWeights` the resident weights' device copies are
      taken from and left in, so the next run uploads none (None: uploaded and dropped per run).  Only
      when something can release it when the memory is wanted (ComfyUI's sampler node registers it with
      ComfyUI's model management).
    * ``parallel``: a :class:`~stepvideo_core.parallel.ParallelContext` when this process is one rank of a
      parallel run (see :func:`~stepvideo_core.sampling.sample`).
    """

    device: Union[None, str, torch.device] = None
    blocks_on_device: Optional[int] = None
    batch_cfg: bool = True
    streamer_mode: str = "auto"
    cuda_api: Optional["TorchCuda"] = None
    kept: Optional["KeptWeights"] = None
    parallel: Optional["ParallelContext"] = None
