"""fp8 weights on the CPU: time and error of the fp8-matmul and dequantise paths against bf16.

    python bench/bench_fp8.py [--tokens 1024] [--heads 8] [--layers 4] [--runs 3]

1. One Linear of each DiT shape family (width D = heads x 128): q|k|v (D -> 3D), FFN up
   (D -> 4D) and FFN down (4D -> D), on ``--tokens`` rows.
2. A reduced-width DiT forward (official structure, random weights).
Times are the minimum process CPU time of ``--runs`` calls.  Errors are relative Frobenius errors against the same computation in fp32; bf16 is
listed too, as the yardstick.  CPU fp8 kernels are reference implementations (slow
element-wise casts), so the CPU time ratios say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core import build_transformer, fp8  # noqa: E402
from stepvideo_core.cli import smoke_inputs  # noqa: E402
from stepvideo_core.tiny import random_state_dict  # noqa: E402


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
        layer.take_tensor("weight", w, torch.device("cpu"), None)
        xb, wb = x.bfloat16(), w.bfloat16()
        t_bf16, y_bf16 = timed(lambda: F.linear(xb, wb), runs)
        row = {"layer": name, "bf16 ms": t_bf16 * 1e3, "bf16 err": rel(y_bf16, ref)}
        for mode in ("matmul", "dequantize"):
            layer.matmul_mode = mode
            t, y = timed(lambda: layer(xb), runs)
            row[f"{mode} x"] = t / t_bf16
            row[f"{mode} err"] = rel(y, ref)
        rows.append(row)
    return rows


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
            owner.take_tensor(leaf, tensor, torch.device("cpu"), None)
        else:
            setattr(owner, leaf, torch.nn.Parameter(tensor.to(torch.bfloat16), requires_grad=False))
    inputs = smoke_inputs(fp32, frames=3, height=8, width=16)
    with torch.no_grad():
        ref = fp32(**inputs)
        t_bf16, y_bf16 = timed(lambda: bf16(**inputs), runs)
        row = {"layer": f"DiT forward (D={heads * 128}, {layers} blocks)", "bf16 ms": t_bf16 * 1e3,
               "bf16 err": rel(y_bf16, ref)}
        for mode in ("matmul", "dequantize"):
            fp8.set_matmul_mode(q, mode)
            t, y = timed(lambda: q(**inputs), runs)
            row[f"{mode} x"] = t / t_bf16
            row[f"{mode} err"] = rel(y, ref)
    return [row]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = linear_rows(args.tokens, args.heads * 128, args.runs) + model_rows(args.heads, args.layers, args.runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp8 matmul on cpu: "
          f"{fp8.fp8_matmul_supported(torch.device('cpu'))}")
    print(f"{'':38} {'bf16 ms':>8} {'bf16 err':>9} {'matmul x':>9} {'matmul err':>10} {'dequant x':>9} "
          f"{'dequant err':>11}")
    for r in rows:
        print(f"{r['layer']:38} {r['bf16 ms']:8.1f} {r['bf16 err']:9.4f} {r['matmul x']:9.2f} "
              f"{r['matmul err']:10.4f} {r['dequantize x']:9.2f} {r['dequantize err']:11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
