"""Values that travel between StepVideo nodes (the pack-private socket types)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

STEPVIDEO_MODEL = "STEPVIDEO_MODEL"


@dataclasses.dataclass(frozen=True)
class StepVideoModelHandle:
    """What a ``STEPVIDEO_MODEL`` socket carries: a light handle, never a copy of weights.

    `transformer` is the loaded base DiT, shared by every handle derived from this one
    (a LoRA loader returns ``dataclasses.replace(handle, adapters=...)``, not a deep copy).
    The weights rest on `offload_device`; `device` is where the sampler computes.
    `attention` is the attention backend the sampler applies at run time, so that handles
    sharing one transformer can differ in it.
    """

    transformer: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    offload_device: torch.device
    attention: str
    source: Path
    adapters: tuple = ()

    @property
    def config(self):
        """Return the transformer's ``StepVideoDiTConfig``."""
        return self.transformer.config

