"""The fused projections' head-interleaved row layout and the 3D RoPE, checked from first principles."""

import torch

from stepvideo_core.dit import blocks
from stepvideo_core import layers
from stepvideo_core.dit.rope import apply_rope, rope_tables


def naive_rope(x, frames, height, width):
    """Direct transcription of the reference formula, chunk by chunk, position by position (fp32)."""
    out = torch.empty_like(x)
    tokens = [(t, y, w) for t in range(frames) for y in range(height) for w in range(width)]
    for n, position in enumerate(tokens):
        start = 0
        for p, d in zip(position, (64, 32, 32)):
            chunk = x[:, n, :, start:start + d]
            inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            angle = torch.cat([p * inv, p * inv]).float()
            x1, x2 = chunk[..., : d // 2], chunk[..., d // 2:]
            rotated = torch.cat([-x2, x1], dim=-1)
            out[:, n, :, start:start + d] = chunk * angle.cos() + rotated * angle.sin()
            start += d
    return out


def test_rope_matches_the_formula_and_token_order():
    frames, height, width = 3, 2, 4
    x = torch.randn(1, frames * height * width, 2, 128, generator=torch.Generator().manual_seed(0))
    ours = apply_rope(x, rope_tables(frames, height, width, torch.float32, x.device))
    torch.testing.assert_close(ours, naive_rope(x, frames, height, width), rtol=1e-5, atol=1e-5)


def test_rope_angles_are_rounded_to_bf16_before_cos_sin():
    frames = 40
    cos, _, _ = rope_tables(frames, 1, 1, torch.bfloat16, torch.device("cpu"))
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    angles = torch.outer(torch.arange(frames).float(), inv)
    rounded_first = angles.to(torch.bfloat16).cos()
    rounded_last = angles.cos().to(torch.bfloat16)
    assert torch.equal(cos[:, :32], rounded_first)
    assert not torch.equal(cos[:, :32], rounded_last)


def test_wqkv_rows_are_interleaved_per_head(monkeypatch):
    """Rows [384h, 384h+128) feed q of head h, the next 128 k, the next 128 v."""
    dim, heads = 256, 2
    attn = blocks.SelfAttention(dim, 128, device="cpu", dtype=torch.float32)
    weight = torch.zeros(3 * dim, dim)
    for row in range(3 * dim):  # each output channel = its own row index x input channel 0
        weight[row, 0] = float(row)
    attn.wqkv.weight.data = weight
    attn.wo.weight.data = torch.eye(dim)
    attn.q_norm.weight.data = torch.ones(128)
    attn.k_norm.weight.data = torch.ones(128)
    seen = {}
    monkeypatch.setattr(blocks, "apply_rope", lambda x, rope: x)
    monkeypatch.setattr(blocks, "attention", lambda q, k, v, **kw: seen.update(q=q, k=k, v=v) or v)
    monkeypatch.setattr(layers.RMSNorm, "forward", lambda self, x: x)
    x = torch.zeros(1, 1, dim)
    x[..., 0] = 1.0
    attn(x, rope=None)
    for h in range(heads):
        base = 384 * h
        assert seen["q"][0, h, 0].tolist() == [float(base + i) for i in range(128)]
        assert seen["k"][0, h, 0].tolist() == [float(base + 128 + i) for i in range(128)]
        assert seen["v"][0, h, 0].tolist() == [float(base + 256 + i) for i in range(128)]


def test_wkv_rows_are_interleaved_per_head(monkeypatch):
    dim = 256
    cross = blocks.CrossAttention(dim, 128, device="cpu", dtype=torch.float32)
    weight = torch.zeros(2 * dim, dim)
    weight[:, 0] = torch.arange(2 * dim, dtype=torch.float32)
    cross.wkv.weight.data = weight
    cross.wq.weight.data = torch.eye(dim)
    cross.wo.weight.data = torch.eye(dim)
    seen = {}
    monkeypatch.setattr(blocks, "attention", lambda q, k, v, **kw: seen.update(k=k, v=v) or q)
    monkeypatch.setattr(layers.RMSNorm, "forward", lambda self, x: x)
    context = torch.zeros(1, 3, dim)
    context[..., 0] = 1.0
    cross(torch.zeros(1, 2, dim), context, mask=None)
    for h in range(2):
        assert seen["k"][0, h, 0].tolist() == [float(256 * h + i) for i in range(128)]
        assert seen["v"][0, h, 0].tolist() == [float(256 * h + 128 + i) for i in range(128)]
