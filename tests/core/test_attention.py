"""The attention dispatch: SDPA reference path, GPU backends selected/refused correctly.

SageAttention and flash-attn need CUDA; here their branch is exercised with a
stand-in module injected into sys.modules, so the dispatch is tested both ways.
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from stepvideo_core import attention as attn
from stepvideo_core.attention import AttentionBackendError


def qkv(b=2, h=3, s=5, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(3)]


def test_sdpa_default_matches_explicit_softmax():
    q, k, v = qkv()
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(attn.attention(q, k, v), weights @ v, rtol=1e-5, atol=1e-6)


def test_boolean_mask_excludes_keys():
    q, k, v = qkv()
    mask = torch.tensor([True, True, False, False, False])[None, None, None, :]
    out = attn.attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, attn.attention(q, k[:, :, :2], v[:, :, :2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sageattention", "flash_attn"])
def test_missing_backend_raises_with_install_hint(monkeypatch, name):
    monkeypatch.setattr(attn, "_module_available", lambda module: False)
    with pytest.raises(AttentionBackendError, match="pip install"):
        attn.check_backend(name)
    assert name not in attn.available_backends()


def test_unknown_backend():
    with pytest.raises(AttentionBackendError, match="expected one of"):
        attn.check_backend("xformers")


@pytest.mark.parametrize("name", ["sageattention", "flash_attn"])
def test_installed_gpu_backend_refuses_cpu_tensors(monkeypatch, name):
    monkeypatch.setattr(attn, "_module_available", lambda module: True)
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(AttentionBackendError, match="only on CUDA"):
        attn.attention(q, k, v, backend=name)


def test_auto_on_cpu_is_sdpa(monkeypatch):
    monkeypatch.setattr(attn, "_module_available", lambda module: True)
    assert attn.resolve_backend("auto", torch.device("cpu"), torch.bfloat16, masked=False) == "sdpa"


def test_auto_prefers_sageattention_then_flash_on_cuda(monkeypatch):
    installed = {"sageattention", "flash_attn"}
    monkeypatch.setattr(attn, "_module_available", lambda module: module in installed)
    cuda = torch.device("cuda")
    assert attn.resolve_backend("auto", cuda, torch.bfloat16, masked=False) == "sageattention"
    installed.discard("sageattention")
    assert attn.resolve_backend("auto", cuda, torch.bfloat16, masked=False) == "flash_attn"
    assert attn.resolve_backend("auto", cuda, torch.float32, masked=False) == "sdpa"
    assert attn.resolve_backend("auto", cuda, torch.bfloat16, masked=True) == "sdpa"


def fake_gpu_backends(monkeypatch, calls):
    """Stand-ins recording their calls and computing with SDPA in the layout each library uses."""
    sage = types.ModuleType("sageattention")

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        calls.append(("sageattention", tensor_layout, is_causal))
        return F.scaled_dot_product_attention(q, k, v)

    sage.sageattn = sageattn
    flash = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False):  # [B, S, H, D] layout
        calls.append(("flash_attn", tuple(q.shape), causal))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    flash.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "sageattention", sage)
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setattr(attn, "_module_available", lambda module: True)
    monkeypatch.setattr(attn, "backend_unavailable_reason",
                        lambda name, device=None, dtype=None: None if name in attn.BACKENDS else "unknown")


@pytest.mark.parametrize("name", ["sageattention", "flash_attn"])
def test_gpu_backend_branch_is_called_with_its_layout(monkeypatch, name):
    calls = []
    fake_gpu_backends(monkeypatch, calls)
    q, k, v = qkv(b=1, h=2, s=7, d=8)
    out = attn.attention(q, k, v, backend=name)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert calls and calls[0][0] == name
    if name == "flash_attn":
        assert calls[0][1] == (1, 7, 2, 8)  # sequence before heads
    else:
        assert calls[0][1] == "HND"


def test_masked_calls_never_reach_gpu_kernels(monkeypatch):
    calls = []
    fake_gpu_backends(monkeypatch, calls)
    q, k, v = qkv()
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    attn.attention(q, k, v, mask=mask, backend="sageattention")
    assert calls == []


def test_model_refuses_unavailable_backend_at_selection(monkeypatch):
    from stepvideo_core import build_transformer
    monkeypatch.setattr(attn, "_module_available", lambda module: False)
    model = build_transformer(dict(num_layers=1, num_attention_heads=1, caption_channels=[8, 4]))
    with pytest.raises(AttentionBackendError, match="sageattention"):
        model.attention_backend = "sageattention"
    model.attention_backend = "auto"
    assert model.attention_backend == "auto"
