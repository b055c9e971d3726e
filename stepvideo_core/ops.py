"""Layer factories ("operations") that models are built from.

Every model in this package builds its weight-carrying layers through an
``operations`` namespace instead of ``torch.nn`` directly, in the manner of
ComfyUI's ``comfy.ops``.  This keeps the model code ignorant of *how* a weight
becomes a matmul: later families (scaled fp8 storage, block streaming,
on-the-fly LoRA) subclass these layers and are injected at build time without
touching a single line of model code.

The plain family below skips PyTorch's random initialisation: weights are
always loaded from a checkpoint afterwards, and initialising a 30B model only
to overwrite it costs minutes (and is impossible on the ``meta`` device anyway).
"""

from __future__ import annotations

from torch import nn

from .layers import RMSNorm


class _NoInit:
    """Mixin: leave parameters uninitialised (they are loaded from a checkpoint)."""

    def reset_parameters(self) -> None:  # noqa: D401 - torch hook
        return None


class Linear(_NoInit, nn.Linear):
    """``nn.Linear`` without random init; forward is exactly ``F.linear``."""


class Conv2d(_NoInit, nn.Conv2d):
    """``nn.Conv2d`` without random init."""


class Conv3d(_NoInit, nn.Conv3d):
    """``nn.Conv3d`` without random init."""


class LayerNorm(_NoInit, nn.LayerNorm):
    """``nn.LayerNorm`` without init (affine weights come from the checkpoint)."""


class GroupNorm(_NoInit, nn.GroupNorm):
    """``nn.GroupNorm`` without init."""


class plain:  # noqa: N801 - a namespace, named like ComfyUI's op families
    """The default operations: ordinary PyTorch layers, weights stored in the compute dtype."""

    Linear = Linear
    Conv2d = Conv2d
    Conv3d = Conv3d
    LayerNorm = LayerNorm
    GroupNorm = GroupNorm
    RMSNorm = RMSNorm  # StepFun's RMS norm (fp32 statistics), ``RMSNorm(dim, eps, device=, dtype=)``

