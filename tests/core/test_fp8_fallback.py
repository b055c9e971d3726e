"""fp8 weights on a torch without the CPU fp8 matmul: "auto" takes the dequantise path and stays in its bound.

torch 2.9.1 (what ComfyUI users run) has ``torch._scaled_mm`` on the CPU for per-tensor
scales only; the pack multiplies with row-wise scales, so there its probe must say "no"
and every fp8 layer must dequantise.  These tests run under every torch: a torch without
the kernel is simulated by a ``torch._scaled_mm`` that fails the way 2.9.1's does, so the
pack's own probe (not a patched answer) decides, and nothing may call the kernel after it.
The bound is the dequantise path's one from tests/core/test_fp8.py (0.04, relative to fp32).
"""

import pytest
import torch
import torch.nn.functional as F

from stepvideo_core import fp8, load_transformer
from stepvideo_core.cli import smoke_inputs
from tests.core.test_fp8 import block_outputs, make_layer, rel
from tests.factory import TINY_DIT_CONFIG, write_tiny_dit

DEQUANTIZE_BOUND = 0.04
MATMUL_BOUND = 0.05
TORCH_291_ERROR = ("(scale_a.numel() == 1 && scale_b.numel() == 1) INTERNAL ASSERT FAILED at "
                   "\"/pytorch/aten/src/ATen/native/Blas.cpp\":249, please report a bug to PyTorch. Now _scaled_mm "
                   "only supports per-tensor scaling for CPU backend.")


@pytest.fixture
def fresh_probe(monkeypatch):
    """An empty probe cache for this test (restored afterwards)."""
    monkeypatch.setattr(fp8, "_FP8_MATMUL_PROBED", {})


@pytest.fixture
def torch_without_cpu_fp8_matmul(monkeypatch, fresh_probe):
    """``torch._scaled_mm`` behaves like torch 2.9.1's on the CPU (row-wise scales refused); returns its call log."""
    calls = []

    def scaled_mm(a, b, *, scale_a, scale_b, **kwargs):
        calls.append((tuple(scale_a.shape), tuple(scale_b.shape)))
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError(TORCH_291_ERROR)
        raise AssertionError("the pack never calls _scaled_mm with per-tensor scales")

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    return calls


def raising(exc):
    def scaled_mm(*args, **kwargs):
        raise exc
    return scaled_mm


@pytest.mark.parametrize("missing", ["refuses row-wise scales", "not implemented", "absent"])
def test_the_probe_says_no_where_the_kernel_is_missing(monkeypatch, fresh_probe, missing):
    if missing == "absent":
        monkeypatch.delattr(torch, "_scaled_mm")
    else:
        exc = RuntimeError(TORCH_291_ERROR) if missing == "refuses row-wise scales" else NotImplementedError("cpu")
        monkeypatch.setattr(torch, "_scaled_mm", raising(exc))
    assert fp8.fp8_matmul_supported(torch.device("cpu")) is False
    assert fp8._FP8_MATMUL_PROBED == {("cpu", None): False}  # asked once, remembered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_mode_dequantises_a_layer_on_such_a_torch(torch_without_cpu_fp8_matmul, dtype):
    ref, layer = make_layer()
    assert layer.matmul_mode == "auto"
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = layer(x.to(dtype))
        want = ref(x)
        # the dequantised weight, built here from the layer's fp8 values and scales
        weight = (layer.weight.float() * layer.scale_weight[:, None]).to(dtype)
        by_hand = F.linear(x.to(dtype), weight) + layer.bias.to(dtype)
    assert torch_without_cpu_fp8_matmul == [((16, 1), (1, 16))]  # the probe's one call, none from the layer
    assert fp8._FP8_MATMUL_PROBED == {("cpu", None): False}
    assert got.dtype == dtype and got.shape == want.shape
    assert rel(got, want) <= DEQUANTIZE_BOUND
    if dtype == torch.float32:
        assert torch.equal(got, by_hand)  # the same fp32 operations on the same values
    else:  # scales rounded to bf16 before the product here, after it by hand: within a few bf16 ulps
        assert rel(got, by_hand) <= 2.0 ** -7
    layer.matmul_mode = "matmul"  # asked for explicitly, the missing kernel is an error that says what to do
    with pytest.raises(RuntimeError, match="use matmul_mode 'auto' or 'dequantize'"):
        layer(x.to(dtype))


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("fp8_fallback") / "stepvideo-t2v")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_mode_dequantises_the_tiny_dit_on_such_a_torch(tiny_src, torch_without_cpu_fp8_matmul, dtype):
    reference = load_transformer(tiny_src, dtype=torch.float32)
    model = load_transformer(tiny_src, dtype=dtype, weight_format="fp8_scaled")
    assert {m.matmul_mode for m in fp8.fp8_layers(model).values()} == {"auto"}
    inputs = smoke_inputs(reference, frames=3, height=4, width=6)
    ref_blocks, ref_out = block_outputs(reference, inputs)
    blocks, out = block_outputs(model, inputs)
    assert len(torch_without_cpu_fp8_matmul) == 1  # the probe, once; no layer called the kernel
    errors = [rel(a, b) for a, b in zip(blocks, ref_blocks)]
    assert len(errors) == TINY_DIT_CONFIG["num_layers"]
    assert max(errors) <= DEQUANTIZE_BOUND, errors
    assert 1e-4 < rel(out, ref_out) <= DEQUANTIZE_BOUND  # really quantised, and close


def test_auto_mode_uses_what_this_torch_has(monkeypatch, fresh_probe):
    """With the real kernel: the matmul where this torch has it on the CPU, else the dequantise path."""
    real, calls = torch._scaled_mm, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    supported = fp8.fp8_matmul_supported(torch.device("cpu"))
    probe_calls = len(calls)
    ref, layer = make_layer()
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = layer(x), ref(x)
    assert probe_calls == 1 and (len(calls) > probe_calls) is supported
    assert rel(got, want) <= (MATMUL_BOUND if supported else DEQUANTIZE_BOUND)
