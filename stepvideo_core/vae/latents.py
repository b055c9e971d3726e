"""Conversion between the core's latent layout and ComfyUI's LATENT layout.

The core (and the official code) uses [B, F, C, h, w]; ComfyUI's video convention,
which the pack's LATENT ``{"samples": ...}`` follows, is [B, C, F, h, w].  Conversions
happen at this one boundary.
"""

from __future__ import annotations

import torch


def to_comfy_latent(x_bfchw: torch.Tensor) -> torch.Tensor:
    """[B, F, C, h, w] -> [B, C, F, h, w] (contiguous), for ``{"samples": ...}``."""
    if x_bfchw.ndim != 5:
        raise ValueError(f"expected latents [B, F, C, h, w], got shape {list(x_bfchw.shape)}")
    return x_bfchw.transpose(1, 2).contiguous()


def from_comfy_latent(x_bcfhw: torch.Tensor) -> torch.Tensor:
    """[B, C, F, h, w] (ComfyUI LATENT ``samples``) -> [B, F, C, h, w] (contiguous)."""
    if x_bcfhw.ndim != 5:
        raise ValueError(f"expected a video LATENT [B, C, F, h, w], got shape {list(x_bcfhw.shape)}")
    return x_bcfhw.transpose(1, 2).contiguous()
