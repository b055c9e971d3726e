"""How much arithmetic one DiT block and one sampling step take: the FLOP counts behind the plan
route's time estimate and the GPU check's TFLOP/s (one formula for both).

Counted in FLOPs, 2 per multiply-add; elementwise work (norms, RoPE, GELU, softmax) and what runs
outside the blocks (under 1 % at real sizes) are left out.  Checked against torch's FlopCounterMode
on the real block code in tests/bench/test_gpu_check.py.
"""

from __future__ import annotations

from typing import Optional

from .offload.planner import CLIP_TOKENS, DEFAULT_CONFIG, LLM_TOKENS, latent_tokens

TEXT_TOKENS = CLIP_TOKENS + LLM_TOKENS  # 397 context tokens of the cross-attention


def block_flops(tokens: int, dim: int, batch: int = 1, text_tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs of one DiT block forward, itemised, for ``batch`` samples of ``tokens`` video tokens.

    Per sample with N video tokens, S text tokens and width d:

    * ``linear``: 2 * 14 * N * d^2 -- q|k|v 3, out 1, cross q 1, cross out 1, FFN 4 + 4, all d x d units;
    * ``text_kv``: 2 * 2 * S * d^2 -- the cross-attention k|v projection of the context;
    * ``self_attention``: 4 * N^2 * d -- QK^T and PV, 2 * N^2 * d multiply-adds over all heads;
    * ``cross_attention``: 4 * N * S * d.
    """
    d2 = dim * dim
    items = {"linear": 2 * 14 * tokens * d2, "text_kv": 2 * 2 * text_tokens * d2,
             "self_attention": 4 * tokens * tokens * dim, "cross_attention": 4 * tokens * text_tokens * dim}
    items = {k: v * batch for k, v in items.items()}
    items["total"] = sum(items.values())
    return items


def step_flops(width: int, height: int, frames: int, guided: bool, config: Optional[dict] = None) -> int:
    """FLOPs of the transformer blocks for one sampling step at this size: every block once per model
    call, two calls (or one batch-2 call) with guidance."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = latent_tokens(width, height, frames, cfg["patch_size"])
    return cfg["num_layers"] * block_flops(tokens, dim, batch=2 if guided else 1)["total"]
