"""The bf16 rounding of the 3D RoPE tables (reference section 2.6), checked on its own.

The official code computes the angles p * inv_freq in fp32, rounds them to the activation
dtype (bf16) and only then takes cos/sin.  At positions up to 63 a bf16 angle is off from
the fp32 one by up to 0.125 rad, so cos/sin move by far more than a bf16 ulp; the
whole-model test on the tiny fixture (3 x 4 x 6 tokens) does not notice losing this quirk
(ratio 1.005), so this test is what guards it.

The expected values are computed here in float64 from the official recipe and compared
with a tolerance of 1 bf16 ulp of the output, so no CPU-specific cos/sin rounding can
break it.  Angles whose fp32 value lies within a few fp32 ulps of a bf16 rounding
midpoint are left out: there a last-bit difference in the CPU's fp32 ``pow`` could
legitimately round the other way.
"""

import pytest
import torch

from stepvideo_core.dit.rope import apply_rope, rope_tables

SPLIT = (64, 32, 32)  # channels per axis: frame, row, column
THETA = 10000.0
LONG = 64  # positions 0..63 along the axis under test


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |values| (float64), 8 significant bits."""
    magnitude = values.abs().clamp(min=2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 7)


def official_angles(length: int, dim: int):
    """(bf16-rounded angles as float64 [length, dim/2], usable mask): fp32 p*inv_freq, then bf16."""
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    inv_freq = (1.0 / THETA ** (i / dim)).to(torch.float32).to(torch.float64)  # an fp32 number
    positions = torch.arange(length, dtype=torch.float64)[:, None]
    fp32 = (positions * inv_freq).to(torch.float32)  # the exact fp32 product, rounded once
    rounded = fp32.to(torch.bfloat16).to(torch.float64)
    # distance from the nearest bf16 rounding midpoint, in fp32 ulps of the angle
    half = bf16_ulp(rounded) / 2
    midpoint_gap = ((fp32.to(torch.float64) - rounded).abs() - half).abs()
    fp32_ulp = torch.exp2(torch.floor(torch.log2(fp32.to(torch.float64).abs().clamp(min=2.0 ** -126))) - 23)
    usable = midpoint_gap > 4 * fp32_ulp
    return rounded, usable


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["frames", "rows", "columns"])
def test_bf16_tables_round_the_angles_before_cos_sin(axis):
    grid = [1, 1, 1]
    grid[axis] = LONG
    cos, signed_sin, partner = rope_tables(*grid, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert cos.dtype == signed_sin.dtype == torch.bfloat16 and cos.shape == (LONG, 128)
    offset, dim = sum(SPLIT[:axis]), SPLIT[axis]
    half = dim // 2
    angles, usable = official_angles(LONG, dim)
    assert usable.float().mean() > 0.95  # nearly every angle is tested
    want_cos = torch.cat([angles.cos(), angles.cos()], dim=1)
    want_sin = torch.cat([-angles.sin(), angles.sin()], dim=1)  # rotate_half = [-x2, x1]
    mask = torch.cat([usable, usable], dim=1)
    for got, want in ((cos, want_cos), (signed_sin, want_sin)):
        got = got[:, offset:offset + dim].double()
        error = (got - want).abs()
        assert (error[mask] <= bf16_ulp(want)[mask]).all(), error[mask].max()
    assert torch.equal(partner[offset:offset + dim], offset + (torch.arange(dim) + half) % dim)
    # the other axes sit at position 0 for every token: cos 1, sin 0
    others = [c for c in range(128) if not offset <= c < offset + dim]
    assert (cos[:, others] == 1).all() and (signed_sin[:, others] == 0).all()


def test_the_fp32_angle_tables_are_far_off():
    """Sanity of the test's premise: cos of the fp32 angle differs from the official by many bf16 ulps."""
    angles, usable = official_angles(LONG, 64)
    i = torch.arange(0, 64, 2, dtype=torch.float64)
    exact = torch.arange(LONG, dtype=torch.float64)[:, None] / THETA ** (i / 64)
    drift = (exact.cos() - angles.cos()).abs() / bf16_ulp(angles.cos())
    assert drift[usable].max() > 20


def test_rotation_is_x_cos_plus_rotate_half_x_sin_in_bf16():
    """apply_rope rounds like the official: x*cos and rotate_half(x)*sin each in bf16, then their sum."""
    frames, height, width = 5, 3, 4
    tables = rope_tables(frames, height, width, dtype=torch.bfloat16, device=torch.device("cpu"))
    cos, signed_sin, _ = tables
    x = torch.randn(2, frames * height * width, 2, 128, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    rotated = []
    offset = 0
    for dim in SPLIT:
        chunk = x[..., offset:offset + dim]
        x1, x2 = chunk[..., :dim // 2], chunk[..., dim // 2:]
        rotated.append(torch.cat([-x2, x1], dim=-1))
        offset += dim
    rotated = torch.cat(rotated, dim=-1)
    sign = torch.cat([torch.where(torch.arange(d) < d // 2, -1.0, 1.0) for d in SPLIT]).to(torch.bfloat16)
    sin = signed_sin * sign  # the plain sin table; rotate_half carries the sign here
    expected = x * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    assert torch.equal(apply_rope(x, tables), expected)


def test_token_order_is_frame_row_column():
    frames, height, width = 5, 3, 4
    cos, _, _ = rope_tables(frames, height, width, dtype=torch.bfloat16, device=torch.device("cpu"))
    t, y, x = 2, 1, 3
    token = (t * height + y) * width + x
    for offset, dim, position in zip((0, 64, 96), SPLIT, (t, y, x)):
        angles, _ = official_angles(max(frames, height, width), dim)
        want = angles[position].cos()
        got = cos[token, offset:offset + dim // 2].double()
        assert ((got - want).abs() <= bf16_ulp(want)).all(), (offset, position)
