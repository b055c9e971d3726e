"""Transformer block of the Step-Video DiT (``transformer_blocks.{i}.*``).

Module and parameter names follow the official checkpoint 1:1.  The math is
the official one, step for step, including the places where the order of
operations decides bf16 rounding (documented inline).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops as default_ops
from ..attention import attention
from .config import BLOCK_NORM_EPS, QK_NORM_EPS
from .rope import apply_rope


class SelfAttention(nn.Module):
    """3D self-attention: fused head-interleaved ``wqkv``, QK RMSNorm, 3D RoPE, ``wo``.

    ``wqkv`` rows are laid out per head: [q_h | k_h | v_h] for h = 0..H-1.
    """

    def __init__(self, dim: int, head_dim: int, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.head_dim = head_dim
        self.n_heads = dim // head_dim
        self.wqkv = operations.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
        self.wo = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.q_norm = operations.RMSNorm(head_dim, QK_NORM_EPS, device=device, dtype=dtype)
        self.k_norm = operations.RMSNorm(head_dim, QK_NORM_EPS, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: tuple, backend: str = "sdpa") -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; no mask (every video token sees every other)."""
        b, n, _ = x.shape
        qkv = self.wqkv(x).view(b, n, self.n_heads, 3 * self.head_dim)
        q, k, v = torch.split(qkv, self.head_dim, dim=-1)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        v = v.contiguous()  # an exact copy of v lets the fused q|k|v buffer (3 hidden-state copies) go now
        del qkv
        heads_first = [q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)]
        del q, k, v  # the list holds the only references, so the seam below may free them early
        out = self.attend(heads_first, backend)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))

    def attend(self, qkv: list, backend) -> torch.Tensor:
        """Attention of q [B, H, L, d] over k, v (the list ``[q, k, v]``, emptied): the pack's dispatch.

        The one seam of sequence parallelism: :func:`stepvideo_core.parallel.attach` gives a block's
        instance an ``attend`` that exchanges heads for tokens around this same call.  q, k and v come
        in a list the callee empties so that the exchange can drop each local tensor once it is copied
        into the send buffer (three hidden-state copies less at a sequence-parallel block's peak).
        """
        q, k, v = qkv
        qkv.clear()
        return attention(q, k, v, backend=backend)


class CrossAttention(nn.Module):
    """Cross-attention to the text context: ``wq`` on the video tokens, fused ``wkv``
    (rows per head: [k_h | v_h]) on the context, QK RMSNorm, no RoPE, masked."""

    def __init__(self, dim: int, head_dim: int, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.head_dim = head_dim
        self.n_heads = dim // head_dim
        self.wq = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.wkv = operations.Linear(dim, 2 * dim, bias=False, device=device, dtype=dtype)
        self.wo = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.q_norm = operations.RMSNorm(head_dim, QK_NORM_EPS, device=device, dtype=dtype)
        self.k_norm = operations.RMSNorm(head_dim, QK_NORM_EPS, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor],
                backend: str = "sdpa") -> torch.Tensor:
        """x [B, L, D], context [B, S, D], mask bool [B, 1, 1, S] (True = valid) -> [B, L, D]."""
        b, n, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, n, self.n_heads, self.head_dim))
        kv = self.wkv(context).view(b, context.shape[1], self.n_heads, 2 * self.head_dim)
        k, v = torch.split(kv, self.head_dim, dim=-1)
        k = self.k_norm(k)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=mask, backend=backend)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class GELUProjection(nn.Module):
    """``ff.net.0``: Linear (key ``proj``) followed by tanh-approximated GELU."""

    def __init__(self, dim_in: int, dim_out: int, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: same kernel and values as F.gelu, without a second 4x-wide buffer
        return torch.ops.aten.gelu_(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``ff.net = [GELUProjection, Identity, Linear]``; index 1 exists only to keep the key ``net.2``."""

    def __init__(self, dim: int, inner_dim: int, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.net = nn.ModuleList([
            GELUProjection(dim, inner_dim, operations, device, dtype),
            nn.Identity(),
            operations.Linear(inner_dim, dim, bias=False, device=device, dtype=dtype),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class StepVideoBlock(nn.Module):
    """One DiT block: modulated self-attn, ungated cross-attn on the raw stream, modulated FFN."""

    def __init__(self, dim: int, head_dim: int, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.norm1 = operations.LayerNorm(dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.attn1 = SelfAttention(dim, head_dim, operations, device, dtype)
        self.norm2 = operations.LayerNorm(dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.attn2 = CrossAttention(dim, head_dim, operations, device, dtype)
        self.ff = FeedForward(dim, 4 * dim, operations, device, dtype)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim, device=device, dtype=dtype),
                                              requires_grad=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t6: torch.Tensor, rope: tuple,
                mask: Optional[torch.Tensor], backend: str = "sdpa") -> torch.Tensor:
        """x [B, L, D]; context [B, S, D]; t6 [B, 6D] from AdaLN-single -> [B, L, D]."""
        # .to(): a no-op unless the table rests elsewhere than the activations (ComfyUI's partial loading)
        modulation = self.scale_shift_table.to(t6.device)[None] + t6.reshape(-1, 6, self.dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        # Each line is the official expression evaluated in place on a fresh tensor: the same
        # elementwise operations in the same order (so the same bits), fewer live buffers.
        h = self.norm1(x).mul_(1 + scale_msa).add_(shift_msa)
        attn = self.attn1(h, rope, backend)
        del h
        x = attn.mul_(gate_msa).add_(x)                       # gate_msa * attn + x
        # cross-attention reads the residual stream itself: no norm, no modulation, no gate
        x = self.attn2(x, context, mask, backend).add_(x)     # cross + x
        h = self.norm2(x).mul_(1 + scale_mlp).add_(shift_mlp)
        return self.ff(h).mul_(gate_mlp).add_(x)              # gate_mlp * ff + x
