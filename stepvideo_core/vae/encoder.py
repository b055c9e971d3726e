"""The Video-VAE v2 encoder (official ``VideoEncoder``, version 2), own implementation.

17 frames -> 3 latent frames, H/16 x W/16: level 0 halves space per frame, levels 1
and 2 halve time and space causally (17 -> 9 -> 5), and the patchify layer halves
all three (5 + 1 zero frame -> 3).  Output: moments [B, T', 2z, h, w] (mean | logvar).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops as default_ops
from .config import GROUPS, NORM_EPS, PATCH, VAEConfig
from .layers import (CausalConv, Downsample2D, Downsample3D, MidAttention, PatchifyConv, ResBlock,
                     average_unshuffle, norm_silu)


class Level(nn.Module):
    """One resolution level: ``block`` (res-blocks) and, except at the end, a re-sampler."""

    resample_name = "downsample"

    def __init__(self, blocks: list, resample: nn.Module = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(self.resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Mid(nn.Module):
    """``mid``: res-block, causal single-head attention, res-block, all at one width."""

    def __init__(self, channels: int, operations, device=None, dtype=None):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, operations, device, dtype)
        self.attn_1 = MidAttention(channels, operations, device, dtype)
        self.block_2 = ResBlock(channels, channels, operations, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class VideoEncoder(nn.Module):
    """``encoder``: video [B, 3, T, H, W] in [-1, 1] -> moments [B, T', 2z, H/16, W/16]."""

    def __init__(self, config: VAEConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        widths = config.encoder_widths
        self.conv_in = CausalConv(config.in_channels, config.enc_ch, 3, operations, **kw)
        self.down = nn.ModuleList()
        block_in = config.enc_ch
        for level, width in enumerate(widths):
            blocks = [ResBlock(block_in if i == 0 else width, width, operations, **kw)
                      for i in range(config.num_res_blocks)]
            resample = None
            if level != len(widths) - 1:
                down = Downsample3D if level in config.encoder_temporal_down else Downsample2D
                resample = down(width, operations, **kw)
            self.down.append(Level(blocks, resample))
            block_in = width
        self.mid = Mid(block_in, operations, **kw)
        self.norm_out = operations.GroupNorm(GROUPS, block_in, eps=NORM_EPS, **kw)
        self.conv_patchify = PatchifyConv(block_in, config.patch_channels, PATCH, operations, **kw)
        self.conv_out = CausalConv(config.patch_channels, 2 * config.z_channels, 3, operations,
                                   channels_last=True, **kw)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Moments [B, T', 2z, h, w] of ``video`` [B, 3, T, H, W] (one independent chunk)."""
        h = self.conv_in(video)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = norm_silu(h, self.norm_out)
        # both v2 output stages are a conv plus a weightless channel-averaging shortcut
        h = self.conv_patchify(h).add_(average_unshuffle(h, self.config.patch_channels, PATCH))
        moments = self.conv_out(h).add_(average_unshuffle(h, 2 * self.config.z_channels, 1))
        return moments.transpose(1, 2)
