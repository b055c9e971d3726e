"""The Video-VAE v2 decoder (official ``VideoDecoder``, version 2), own implementation.

3 latent frames -> 17 frames, x16 in space: the unpatchify layer doubles time and space
and drops its first frame (3 -> 5), levels 3 and 2 double time and space (5 -> 10 ->
20), level 1 doubles space per frame, and the first 3 output frames are dropped (20 -> 17).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops as default_ops
from .config import GROUPS, NORM_EPS, PATCH, VAEConfig
from .encoder import Level, Mid
from .layers import CausalConv, ResBlock, UnpatchifyConv, Upsample2D, Upsample3D, duplicate_shuffle, norm_silu


class UpLevel(Level):
    """A decoder level: ``block`` (num_res_blocks + 1 res-blocks) then ``upsample`` (not at level 0)."""

    resample_name = "upsample"


class VideoDecoder(nn.Module):
    """``decoder``: latents [B, z, F, h, w] -> video [B, 3, T, 16h, 16w] (not clamped).

    ``up`` is indexed by level like the checkpoint (``up.0`` is the full-resolution
    level) and run from the last level to level 0.
    """

    def __init__(self, config: VAEConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        widths = config.decoder_widths
        block_in = widths[-1]
        self.conv_in = CausalConv(config.z_channels, config.patch_channels, 3, operations, **kw)
        self.conv_unpatchify = UnpatchifyConv(config.patch_channels, block_in, PATCH, operations, **kw)
        self.mid = Mid(block_in, operations, **kw)
        levels = []
        for level in reversed(range(len(widths))):
            width = widths[level]
            blocks = [ResBlock(block_in if i == 0 else width, width, operations, **kw)
                      for i in range(config.num_res_blocks + 1)]
            resample = None
            if level != 0:
                up = Upsample3D if level in config.decoder_temporal_up else Upsample2D
                resample = up(width, operations, **kw)
            levels.insert(0, UpLevel(blocks, resample))
            block_in = width
        self.up = nn.ModuleList(levels)
        self.norm_out = operations.GroupNorm(GROUPS, block_in, eps=NORM_EPS, **kw)
        self.conv_out = CausalConv(block_in, config.out_channels, 3, operations, channels_last=True,
                                   pad_in_conv=True, **kw)
        # the temporal x2 layers turn the first latent frame into this many warm-up frames
        self.drop_frames = 2 ** len(config.decoder_temporal_up) - 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Frames [B, 3, T, H, W] decoded from ``z`` [B, z, F, h, w] (one independent chunk)."""
        patch = self.config.patch_channels
        h = self.conv_in(z).add_(duplicate_shuffle(z, patch, 1))
        h = self.conv_unpatchify(h).add_(duplicate_shuffle(h, self.config.decoder_widths[-1], PATCH))
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)
        h = self.conv_out(norm_silu(h, self.norm_out))
        return h[:, :, self.drop_frames:]
