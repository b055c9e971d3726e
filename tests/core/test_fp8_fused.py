"""The fp8 paths with fewer kernels per Linear and the same bits as before.

The matmul path quantises its input per row; that used to take six unfused operations per 64 MB chunk
(fp32 copy, abs, amax, division, clamp, cast), on every device.  Off the CPU it now takes one pass: one
reduction and one division written straight to fp8 (:func:`fp8._quantize_in_one_pass`, run here on the
CPU to check its bits and its operations); the CPU keeps row chunks of in-place fp32 operations (its
mixed-dtype kernels would make fp32 copies anyway), without the no-op clamp and with the peaks taken in
the input's dtype.  The dequantise path scales the cast weight in place (one full-size tensor instead of
two).  All are held here to the previous arithmetic bit for bit, and to their operation counts (each
aten operation is a kernel launch on a GPU); bench/bench_fp8.py times both versions side by side.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.op_count import OpCounter
from stepvideo_core import fp8
from tests.capabilities import needs_cpu_fp8_matmul


def unfused_quantize_rows(x):
    """The previous quantisation, kept as the reference: per chunk fp32 copy, abs, amax, /448, div_, clamp_, cast."""
    out = torch.empty(x.shape, dtype=fp8.FP8)
    scales = torch.empty((x.shape[0], 1), dtype=torch.float32)
    step = max(1, fp8._CHUNK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        part = x[start:start + step].to(torch.float32, copy=True)
        scale = (part.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX).clamp_min(fp8._MIN_SCALE)
        out[start:start + step] = part.div_(scale).clamp_(-fp8.FP8_MAX, fp8.FP8_MAX)
        scales[start:start + step] = scale
    return out, scales


def hard_rows(dtype, seed):
    """Rows of every magnitude, zeros, NaN, +-inf, subnormal-sized values, rows whose peak is negative."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 80, generator=gen) * torch.logspace(-30, 30, 48)[:, None]
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 5], x[3, 7] = float("inf"), float("-inf")
    x[4] = -x[4].abs()
    x[5] = torch.tensor(1e-40 if dtype == torch.float32 else 1e-7, dtype=dtype)
    x[6, :] = 448.0
    return x


def one_pass(x):
    out, scales = torch.empty(x.shape, dtype=fp8.FP8), torch.empty(x.shape[0], 1)
    fp8._quantize_in_one_pass(x, out, scales)
    return out, scales


@pytest.mark.parametrize("path", ["quantize_rows", "one-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [1 << 24, 200], ids=["one-chunk", "many-chunks"])
def test_quantising_gives_the_bits_of_the_unfused_code(monkeypatch, path, dtype, chunk):
    monkeypatch.setattr(fp8, "_CHUNK_ELEMENTS", chunk)
    quantise = fp8.quantize_rows if path == "quantize_rows" else one_pass
    for seed in range(4):
        x = hard_rows(dtype, seed)
        want8, want_scale = unfused_quantize_rows(x)
        got8, got_scale = quantise(x)
        assert got8.dtype == fp8.FP8 and got_scale.dtype == torch.float32 and got_scale.shape == (48, 1)
        assert torch.equal(got8.view(torch.uint8), want8.view(torch.uint8))  # NaN bit patterns included
        assert torch.equal(got_scale.nan_to_num(-1.0), want_scale.nan_to_num(-1.0))


def test_off_the_cpu_the_rows_are_quantised_in_one_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(fp8, "_quantize_in_one_pass", lambda x, out, scales: calls.append(("one pass", x.device)))
    monkeypatch.setattr(fp8, "_quantize_in_chunks", lambda x, out, scales: calls.append(("chunks", x.device)))
    fp8.quantize_rows(torch.empty(4, 8, device="meta"))  # any device that is not the CPU
    fp8.quantize_rows(torch.zeros(4, 8))
    assert calls == [("one pass", torch.device("meta")), ("chunks", torch.device("cpu"))]


def test_the_one_pass_is_one_reduction_one_division_and_no_full_size_temporary():
    x = torch.randn(64, 256).bfloat16()
    big = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.numel() >= x.numel() and func.overloadpacket.__name__ \
                    not in ("div",):  # the division writes into the fp8 output itself
                big.append(func.overloadpacket.__name__)
            return result

    out, scales = torch.empty(x.shape, dtype=fp8.FP8), torch.empty(64, 1)
    with OpCounter() as count:
        fp8._quantize_in_one_pass(x, out, scales)
    assert count.ops == Counter({"linalg_vector_norm": 1, "div": 2, "clamp_min_": 1}), count.ops
    with Allocations():
        fp8._quantize_in_one_pass(x, out, scales)
    assert big == []


def fp8_layer(mode):
    layer = fp8.ScaledFp8Linear(256, 384, bias=False, device="meta")
    layer.quantize_on_load = True
    layer.take_tensor("weight", torch.randn(384, 256, generator=torch.Generator().manual_seed(0)),
                      torch.device("cpu"))
    layer.matmul_mode = mode
    return layer


@needs_cpu_fp8_matmul
def test_an_fp8_matmul_call_is_the_quantisation_and_the_gemm(monkeypatch):
    layer = fp8_layer("matmul")
    x = torch.randn(2, 64, 256).bfloat16()
    with torch.no_grad():
        want = layer(x)  # (the kernel probe runs on the first call)
        with OpCounter() as count:
            got = layer(x)
    assert torch.equal(got, want)
    # the CPU path: peaks in bf16, one fp32 copy divided in place, cast into the output; then the GEMM
    assert count.ops == Counter({"abs": 1, "amax": 1, "_to_copy": 2, "div": 1, "clamp_min": 1, "div_": 1,
                                 "copy_": 2, "_scaled_mm": 1}), count.ops
    monkeypatch.setattr(fp8, "_quantize_in_chunks", fp8._quantize_in_one_pass)  # what a GPU runs
    with torch.no_grad(), OpCounter() as count:
        again = layer(x)
    assert torch.equal(again, want)
    assert count.ops == Counter({"linalg_vector_norm": 1, "div": 2, "clamp_min_": 1, "_scaled_mm": 1}), count.ops
    x8, scale = unfused_quantize_rows(x.reshape(-1, 256))
    reference = torch._scaled_mm(x8, layer.weight.t(), scale_a=scale, scale_b=layer.scale_weight.reshape(1, -1),
                                 out_dtype=torch.bfloat16).reshape(2, 64, 384)
    assert torch.equal(got, reference)  # the product of the previous code's quantised rows


def test_a_dequantise_call_makes_one_full_size_weight_and_the_same_bits():
    layer = fp8_layer("dequantize")
    x = torch.randn(3, 256)
    with torch.no_grad(), OpCounter() as count:
        got = layer(x)
    assert count.ops == Counter({"_to_copy": 1, "mul_": 1, "mm": 1}), count.ops  # the cast weight, scaled in place
    weight = layer.weight.to(torch.float32) * layer.scale_weight.reshape(-1, 1)  # the previous two-tensor form
    assert torch.equal(got, torch.nn.functional.linear(x, weight))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(fp8.dequantize_weight(layer.weight, layer.scale_weight, dtype),
                           layer.weight.to(dtype) * layer.scale_weight.reshape(-1, 1).to(dtype))
