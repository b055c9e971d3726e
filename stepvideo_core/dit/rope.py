"""3D rotary position embedding of the Step-Video DiT.

Each 128-channel head is split into [64, 32, 32] channels rotated by the
token's (frame, row, column) index.  Inside a chunk of d channels the rotation
pairs channel i with channel i + d/2 ("half-split", GPT-NeoX style), with
frequencies theta^(-2i/d) for i < d/2 repeated twice.

Bit-parity detail: angles are computed in fp32 and then *rounded to the
activation dtype before* cos/sin, as the official code does; in bf16 this
changes results noticeably, so it is reproduced here on purpose.
"""

from __future__ import annotations

import torch

from .config import ROPE_SPLIT, ROPE_THETA


def _axis_angles(length: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Angles [length, dim] for integer positions 0..length-1 (fp32 math, then cast)."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device).float() / dim))
    positions = torch.arange(length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq).to(dtype)
    return torch.cat((angles, angles), dim=-1)


def rope_tables(frames: int, height: int, width: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token tables for :func:`apply_rope`, tokens ordered frame-major, then row, column.

    Returns (cos [L, 128], signed_sin [L, 128], partner [128]): ``partner`` maps
    each channel to the one it is rotated with; ``signed_sin`` carries the sign
    of rotate_half, so rotation is ``x*cos + x[..., partner]*signed_sin``.
    """
    grids = torch.meshgrid(torch.arange(frames, device=device), torch.arange(height, device=device),
                           torch.arange(width, device=device), indexing="ij")
    cos_parts, sin_parts, partner, sign = [], [], [], []
    offset = 0
    for axis_positions, dim in zip(grids, ROPE_SPLIT):
        angles = _axis_angles(int(axis_positions.max()) + 1, dim, dtype, device)
        pos = axis_positions.reshape(-1)
        cos_parts.append(angles.cos()[pos])
        sin_parts.append(angles.sin()[pos])
        half = dim // 2
        idx = torch.arange(dim, device=device)
        partner.append(offset + (idx + half) % dim)
        sign.append(torch.where(idx < half, -1.0, 1.0).to(device))
        offset += dim
    cos = torch.cat(cos_parts, dim=-1)
    signed_sin = torch.cat(sin_parts, dim=-1) * torch.cat(sign).to(dtype)
    return cos, signed_sin, torch.cat(partner)


def apply_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [B, L, H, 128] by the tables of :func:`rope_tables`; same dtype as x."""
    cos, signed_sin, partner = tables
    cos = cos[None, :, None, :]
    signed_sin = signed_sin[None, :, None, :]
    out = x * cos
    return out.add_(x[..., partner].mul_(signed_sin))  # in place on fresh tensors: same values
