"""fp8 weights on the CPU: time and error of the fp8-matmul and dequantise paths against bf16.

    python bench/bench_fp8.py [--tokens 1024] [--heads 8] [--layers 4] [--runs 3] [--threads N]

1. One Linear of each DiT shape family (width D = heads x 128): q|k|v (D -> 3D), FFN up
   (D -> 4D) and FFN down (4D -> D), on ``--tokens`` rows.
2. A reduced-width DiT forward (official structure, random weights).
Times are the minimum process CPU time of ``--runs`` calls.  Errors are relative Frobenius errors against the same computation in fp32; bf16 is
listed too, as the yardstick.  CPU fp8 kernels are reference implementations (slow
element-wise casts), so the CPU time ratios say nothing about a GPU.

Before / after, in the same run: each fp8 path is timed with the current code and with the previous
one (``before``: activations quantised by a chunked loop of six unfused operations, the dequantised
weight built with two full-size temporaries), which the bench swaps in for those rows; both give the
same bits (checked here).  3. The operations one fp8 Linear call runs (aten ops, each a kernel on a
GPU), before and after, counted with a dispatch mode: the figure that carries over to a GPU, where
these small elementwise kernels and their launches are what the fp8 GEMM pays on top.  Off the CPU
the activations are quantised in one pass (a reduction and a division stored as fp8: no fp32 copy);
the CPU keeps row chunks of in-place fp32 operations, its fastest sequence (its mixed-dtype kernels
would make fp32 copies anyway), so the CPU times show the CPU path and the op counts both.
4. Activation quantisation alone (the FFN-down input of ``--tokens`` rows), CPU time before/after.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.op_count import OpCounter  # noqa: E402
from stepvideo_core import build_transformer, fp8  # noqa: E402
from stepvideo_core.cli import smoke_inputs  # noqa: E402
from stepvideo_core.tiny import random_state_dict  # noqa: E402


def before_quantize_rows(x):
    """The activation quantisation as it was: per 64 MB chunk, fp32 copy, abs, amax, /448, div_, clamp_, cast."""
    out = torch.empty(x.shape, dtype=fp8.FP8, device=x.device)
    scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    step = max(1, fp8._CHUNK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        part = x[start:stop].to(torch.float32, copy=True)
        scale = (part.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX).clamp_min(fp8._MIN_SCALE)
        out[start:stop] = part.div_(scale).clamp_(-fp8.FP8_MAX, fp8.FP8_MAX)
        scales[start:stop] = scale
    return out, scales


def before_dequantize_weight(weight, scale, dtype):
    """The dequantised weight as it was: the cast weight times the cast scale, a second full-size tensor."""
    return weight.to(dtype) * scale.reshape(-1, 1).to(dtype)


@contextlib.contextmanager
def previous_code():
    """Swap the previous quantise/dequantise functions into stepvideo_core.fp8 for the ``before`` rows."""
    saved = fp8.quantize_rows, fp8.dequantize_weight
    fp8.quantize_rows, fp8.dequantize_weight = before_quantize_rows, before_dequantize_weight
    try:
        yield
    finally:
        fp8.quantize_rows, fp8.dequantize_weight = saved


@contextlib.contextmanager
def one_pass_everywhere():
    """Run the off-the-CPU quantisation (one pass, two kernels) on the CPU too, to count its operations."""
    saved = fp8._quantize_in_chunks
    fp8._quantize_in_chunks = fp8._quantize_in_one_pass
    try:
        yield
    finally:
        fp8._quantize_in_chunks = saved


def ops_per_call(layer, x):
    with torch.no_grad(), OpCounter() as count:
        layer(x)
    return count.total, count.ops


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn, runs):
    """(min process CPU time over ``runs`` calls after a warm-up, last output): robust on a shared machine."""
    fn()
    times = []
    for _ in range(runs):
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return min(times), out


def linear_rows(tokens, dim, runs):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, k, n in (("qkv D->3D", dim, 3 * dim), ("ffn up D->4D", dim, 4 * dim), ("ffn down 4D->D", 4 * dim, dim)):
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        x = torch.randn(tokens, k, generator=gen)
        ref = x @ w.T
        layer = fp8.ScaledFp8Linear(k, n, bias=False, device="meta")
        layer.quantize_on_load = True
        layer.take_tensor("weight", w, torch.device("cpu"))
        xb, wb = x.bfloat16(), w.bfloat16()
        t_bf16, y_bf16 = timed(lambda: F.linear(xb, wb), runs)
        row = {"layer": name, "bf16 ms": t_bf16 * 1e3, "bf16 err": rel(y_bf16, ref)}
        for mode in ("matmul", "dequantize"):
            layer.matmul_mode = mode
            if mode == "matmul" and not fp8.fp8_matmul_supported(xb.device):
                continue
            with previous_code():
                t_before, y_before = timed(lambda: layer(xb), runs)
                row[f"{mode} ops before"] = ops_per_call(layer, xb)[0]
            t, y = timed(lambda: layer(xb), runs)
            row[f"{mode} ops"] = ops_per_call(layer, xb)[0]
            if mode == "matmul":  # what a GPU runs: the one-pass quantisation (the CPU keeps its chunks)
                with one_pass_everywhere():
                    row["matmul ops one pass"] = ops_per_call(layer, xb)[0]
            assert torch.equal(y, y_before), f"{name} {mode}: the current code changed the result"
            row[f"{mode} x before"] = t_before / t_bf16
            row[f"{mode} x"] = t / t_bf16
            row[f"{mode} err"] = rel(y, ref)
        rows.append(row)
    return rows


def quantise_row(tokens, dim, runs):
    x = torch.randn(tokens, 4 * dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    before, _ = timed(lambda: before_quantize_rows(x), runs)
    now, _ = timed(lambda: fp8.quantize_rows(x), runs)
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == fp8.FP8 else a, b.view(torch.uint8) if b.dtype == fp8.FP8
                           else b) for a, b in zip(before_quantize_rows(x), fp8.quantize_rows(x)))
    return f"activation quantisation [{tokens}, {4 * dim}] bf16: {before * 1e3:.1f} ms -> {now * 1e3:.1f} ms (CPU path)"


def model_rows(heads, layers, runs):
    config = dict(num_attention_heads=heads, attention_head_dim=128, num_layers=layers, caption_channels=[256, 64])
    shapes = {k: v.shape for k, v in build_transformer(config).state_dict().items()}
    weights = random_state_dict(shapes, 0)

    def make(dtype, ops=None):
        model = build_transformer(config, device="meta", dtype=dtype,
                                  **({"operations": ops} if ops is not None else {}))
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
        return model.eval()

    fp32, bf16 = make(torch.float32), make(torch.bfloat16)
    q = build_transformer(config, device="meta", dtype=torch.bfloat16, operations=fp8.scaled_fp8)
    for name, tensor in weights.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = q.get_submodule(owner_name)
        if isinstance(owner, fp8.ScaledFp8Linear) and owner_name.startswith("transformer_blocks.") and leaf == "weight":
            owner.quantize_on_load = True
            owner.take_tensor(leaf, tensor, torch.device("cpu"))
        else:
            setattr(owner, leaf, torch.nn.Parameter(tensor.to(torch.bfloat16), requires_grad=False))
    inputs = smoke_inputs(fp32, frames=3, height=8, width=16)
    with torch.no_grad():
        ref = fp32(**inputs)
        t_bf16, y_bf16 = timed(lambda: bf16(**inputs), runs)
        row = {"layer": f"DiT forward (D={heads * 128}, {layers} blocks)", "bf16 ms": t_bf16 * 1e3,
               "bf16 err": rel(y_bf16, ref)}
        for mode in ("matmul", "dequantize"):
            if mode == "matmul" and not fp8.fp8_matmul_supported(torch.device("cpu")):
                continue
            fp8.set_matmul_mode(q, mode)
            with previous_code():
                t_before, y_before = timed(lambda: q(**inputs), runs)
            t, y = timed(lambda: q(**inputs), runs)
            assert torch.equal(y, y_before), f"DiT forward {mode}: the current code changed the result"
            row[f"{mode} x before"] = t_before / t_bf16
            row[f"{mode} x"] = t / t_bf16
            row[f"{mode} err"] = rel(y, ref)
    return [row]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = linear_rows(args.tokens, args.heads * 128, args.runs) + model_rows(args.heads, args.layers, args.runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp8 matmul on cpu: "
          f"{fp8.fp8_matmul_supported(torch.device('cpu'))}; time x bf16, before -> after (same bits)")

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    print(f"{'':38} {'bf16 ms':>8} {'bf16 err':>9} {'matmul x before->after':>23} {'matmul err':>10} "
          f"{'dequant x before->after':>24} {'dequant err':>11}")
    for r in rows:
        mm = f"{cell(r, 'matmul x before', '.2f')} -> {cell(r, 'matmul x', '.2f')}"
        dq = f"{cell(r, 'dequantize x before', '.2f')} -> {cell(r, 'dequantize x', '.2f')}"
        print(f"{r['layer']:38} {r['bf16 ms']:8.1f} {r['bf16 err']:9.4f} {mm:>23} {cell(r, 'matmul err', '10.4f'):>10} "
              f"{dq:>24} {cell(r, 'dequantize err', '11.4f'):>11}")
    print("\naten operations per fp8 Linear call (one kernel each on a GPU), before -> after "
          "(matmul: the CPU's chunked path / the one pass a GPU runs):")
    for r in rows:
        if "dequantize ops" in r:
            mm = (f"matmul {r['matmul ops before']} -> {r['matmul ops']} / {r['matmul ops one pass']}"
                  if "matmul ops" in r else "matmul -")
            print(f"  {r['layer']:36} {mm}, dequantize {r['dequantize ops before']} -> {r['dequantize ops']}")
    print("\n" + quantise_row(args.tokens, args.heads * 128, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
