"""3D rotary position embedding of the Step-Video DiT.

Each 128-channel head is split into [64, 32, 32] channels rotated by the
token's (frame, row, column) index.  Inside a chunk of d channels the rotation
pairs channel i with channel i + d/2 ("half-split", GPT-NeoX style), with
frequencies theta^(-2i/d) for i < d/2 repeated twice.

Bit-parity detail: angles are computed in fp32 and then *rounded to the
activation dtype before* cos/sin, as the official code does; in bf16 this
changes results noticeably, so it is reproduced here on purpose.

Rotation without a gather: ``rotate_half`` only swaps the two halves of each chunk, so
:func:`apply_rope` multiplies the swapped halves as strided views of x instead of building a
permuted copy of q and k (``x[..., partner]``) per block.  Every element still gets
``x*cos`` and ``partner*signed_sin``, each rounded to the dtype, then their sum rounded: the
same operations in the same order as the official ``x*cos + rotate_half(x)*sin``, bit for
bit (tests/core/dit/test_rope.py holds it to the gather, fp32 and bf16).
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
    # the axis lengths are the grid sizes themselves: no read-back of positions.max() from the device
    for axis_positions, length, dim in zip(grids, (frames, height, width), ROPE_SPLIT):
        angles = _axis_angles(length, dim, dtype, device)
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


def _chunk_groups(split: tuple) -> tuple:
    """(first channel, chunk size, number of chunks) for each run of equal-sized chunks of ``split``.

    (64, 32, 32) gives ((0, 64, 1), (64, 32, 2)): the frame chunk alone, then the row and column
    chunks together (both 32 wide), so the rotation takes two strided operations per half, not three.
    """
    groups, offset = [], 0
    for dim in split:
        if groups and groups[-1][1] == dim and groups[-1][0] + groups[-1][1] * groups[-1][2] == offset:
            start, size, count = groups[-1]
            groups[-1] = (start, size, count + 1)
        else:
            groups.append((offset, dim, 1))
        offset += dim
    return tuple(groups)


_GROUPS = _chunk_groups(ROPE_SPLIT)


def apply_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [B, L, H, 128] by the tables of :func:`rope_tables`; same dtype as x.

    ``x*cos`` is computed whole; the ``rotate_half`` term is added half-chunk by half-chunk from
    strided views of x (the partner of the first half of a chunk is its second half and the
    reverse), so no permuted copy of x is made: the largest temporary is a quarter of x.
    Element for element the same roundings as ``x*cos + x[..., partner]*signed_sin``.
    """
    cos, signed_sin, _partner = tables
    cos = cos[None, :, None, :]
    signed_sin = signed_sin[None, :, None, :]
    out = x * cos
    for start, size, count in _GROUPS:
        stop, half = start + size * count, size // 2
        # channels [start, stop) as [..., chunk, half (first/second), channel within the half]
        xs = x[..., start:stop].unflatten(-1, (count, 2, half))
        outs = out[..., start:stop].unflatten(-1, (count, 2, half))
        sins = signed_sin[..., start:stop].unflatten(-1, (count, 2, half))
        for target, source in ((0, 1), (1, 0)):
            outs[..., target, :].add_(xs[..., source, :] * sins[..., target, :])
    return out
