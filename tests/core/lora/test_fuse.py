"""Split q/k/v adapters through our fused, head-interleaved layers equal the same update on an unfused reference.

The reference below never uses the loader's mapping: it splits the fused weights the
way the official attention reads them (reference section 2.3), adds ``B A`` to the
separate q, k and v weights as any trainer would, and runs attention from them.
"""

import pytest
import torch
import torch.nn.functional as F

from stepvideo_core.dit.rope import apply_rope, rope_tables
from stepvideo_core.lora import LoraEntry, attached, load_lora
from stepvideo_core.lora.fuse import Slot
from stepvideo_core.tiny import write_tiny_lora

HEAD = 128


def split(fused, parts):
    """[heads*parts*128, D] fused weight -> list of `parts` separate [heads*128, D] weights."""
    heads = fused.shape[0] // (parts * HEAD)
    view = fused.view(heads, parts, HEAD, -1)
    return [view[:, i].reshape(heads * HEAD, -1) for i in range(parts)]


def lora_update(truth, module, index):
    layer = next(t for t in truth if t["module"] == module and (t["part"] or (None,))[0] == index)
    return layer["scale"] * layer["up"] @ layer["down"]


def heads(t, n):
    return t.view(t.shape[0], t.shape[1], n, HEAD)


def reference_self_attention(attn, wq, wk, wv, wo, x, rope):
    n = attn.n_heads
    q = apply_rope(attn.q_norm(heads(x @ wq.T, n)), rope)
    k = apply_rope(attn.k_norm(heads(x @ wk.T, n)), rope)
    v = heads(x @ wv.T, n)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) @ wo.T


def reference_cross_attention(attn, wq, wk, wv, wo, x, context):
    n = attn.n_heads
    q = attn.q_norm(heads(x @ wq.T, n))
    k = attn.k_norm(heads(context @ wk.T, n))
    v = heads(context @ wv.T, n)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) @ wo.T


@pytest.fixture(scope="module")
def split_lora(model, tmp_path_factory):
    path, truth = write_tiny_lora(tmp_path_factory.mktemp("lora") / "split.safetensors", style="diffusers",
                                  keys="kohya", alpha=3.0, rank=4, seed=7)
    return load_lora(path, model), truth


@pytest.mark.parametrize("mode", ["merge", "on_the_fly"])
def test_split_qkv_lora_on_fused_self_attention_equals_unfused_reference(model, split_lora, mode):
    adapter, truth = split_lora
    block = model.transformer_blocks[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2 * 2 * 3, 256, generator=gen)
    rope = rope_tables(2, 2, 3, torch.float32, x.device)
    name = "transformer_blocks.1.attn1.wqkv"
    with torch.no_grad():
        base = split(block.attn1.wqkv.weight, 3)
        wq, wk, wv = (w + lora_update(truth, name, i) for i, w in enumerate(base))
        wo = block.attn1.wo.weight + lora_update(truth, "transformer_blocks.1.attn1.wo", None)
        want = reference_self_attention(block.attn1, wq, wk, wv, wo, x, rope)
        unchanged = reference_self_attention(block.attn1, *base, block.attn1.wo.weight, x, rope)
    with attached(model, [LoraEntry(adapter, 1.0, mode)]), torch.no_grad():
        got = block.attn1(x, rope)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - unchanged).abs().max() > 1e-3  # the LoRA does change the output


@pytest.mark.parametrize("mode", ["merge", "on_the_fly"])
def test_split_qkv_lora_on_fused_cross_attention_equals_unfused_reference(model, split_lora, mode):
    adapter, truth = split_lora
    block = model.transformer_blocks[0]
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 5, 256, generator=gen), torch.randn(1, 7, 256, generator=gen)
    with torch.no_grad():
        wq = block.attn2.wq.weight + lora_update(truth, "transformer_blocks.0.attn2.wq", None)
        wk, wv = (w + lora_update(truth, "transformer_blocks.0.attn2.wkv", i)
                  for i, w in enumerate(split(block.attn2.wkv.weight, 2)))
        wo = block.attn2.wo.weight + lora_update(truth, "transformer_blocks.0.attn2.wo", None)
        want = reference_cross_attention(block.attn2, wq, wk, wv, wo, x, context)
    with attached(model, [LoraEntry(adapter, 1.0, mode)]), torch.no_grad():
        got = block.attn2(x, context, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_slot_views_are_the_documented_rows():
    fused = torch.arange(2 * 3 * HEAD, dtype=torch.float32)[:, None].expand(-1, 4)
    k = Slot("k", 3, 1, HEAD).of_weight(fused)           # [heads, 128, 4]
    assert k[0, 0, 0] == 128 and k[1, 0, 0] == 384 + 128 and k[1, -1, 0] == 384 + 255
    v = Slot("v", 2, 1, HEAD).of_output(torch.arange(2 * 2 * HEAD, dtype=torch.float32)[None])
    assert v[0, 0, 0] == 128 and v[0, 1, 0] == 256 + 128
