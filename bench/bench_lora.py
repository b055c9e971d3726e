"""LoRA cost on one DiT block: merge/restore time and the on-the-fly overhead per forward.

    python bench/bench_lora.py [--heads 8] [--rank 32] [--tokens 2048] [--device cpu] [--runs 3] [--threads N]

One official-structure block of width D = heads x 128 (48 heads = the released model)
with a rank-``--rank`` adapter on every Linear, named the way trainers do (split
``to_q``/``to_k``/``to_v``, mapped into the fused rows).  Reports, for full-precision
(bf16 on CUDA, fp32 on the CPU) and scaled-fp8 weights: attach+detach time in merge mode
(fp8: dequantise, merge, re-quantise, restore), and the block forward time without an
adapter, merged, and on the fly.  The extra memory of each mode is printed too: merge
keeps an exact copy of every touched weight; on the fly keeps the adapter tensors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core import fp8, ops  # noqa: E402
from stepvideo_core.dit.blocks import StepVideoBlock  # noqa: E402
from stepvideo_core.dit.rope import rope_tables  # noqa: E402
from stepvideo_core.lora import LoraEntry, attached, load_lora  # noqa: E402
from stepvideo_core.tiny import random_state_dict, write_tiny_lora  # noqa: E402


class OneBlock(torch.nn.Module):
    """A model with a single block, named like the DiT (``transformer_blocks.0``) so adapters resolve."""

    def __init__(self, dim, operations, device, dtype):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([StepVideoBlock(dim, 128, operations, device, dtype)])


def timed(fn, runs, device):
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dim = args.heads * 128
    config = dict(num_attention_heads=args.heads, attention_head_dim=128, num_layers=1, caption_channels=[96, 48])
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = write_tiny_lora(Path(tmp) / "bench.safetensors", config=config, style="diffusers", keys="kohya",
                                  rank=args.rank, alpha=float(args.rank), dtype=torch.bfloat16)
        print(f"block width {dim} ({args.heads} heads), rank {args.rank}, {args.tokens} tokens, {device}, {dtype}")
        for weights in ("full", "fp8_scaled"):
            family = fp8.scaled_fp8 if weights == "fp8_scaled" else ops.plain
            model = OneBlock(dim, family, "meta", dtype)
            shapes = {k: v.shape for k, v in model.state_dict().items()}
            model.load_state_dict({k: v.to(device, dtype) for k, v in random_state_dict(shapes).items()}, assign=True)
            if weights == "fp8_scaled":
                for layer in fp8.fp8_layers(model).values():
                    w8, scale = fp8.quantize_weight(layer.weight)
                    layer.weight = torch.nn.Parameter(w8, requires_grad=False)
                    layer.register_buffer("scale_weight", scale)
            adapter = load_lora(path, model)  # EXTRA layers outside the block stay unmatched: fine here
            block = model.transformer_blocks[0]
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, args.tokens, dim, generator=gen).to(device, dtype)
            context = torch.randn(1, 64, dim, generator=gen).to(device, dtype)
            t6 = (torch.randn(1, 6 * dim, generator=gen) * 0.1).to(device, dtype)
            side = int(args.tokens ** 0.5)
            rope = rope_tables(1, side, args.tokens // side, dtype, device)
            x = x[:, :side * (args.tokens // side)]

            def forward():
                with torch.inference_mode():
                    return block(x, context, t6, rope, None)

            def toggle():
                with attached(model, [LoraEntry(adapter, 1.0, "merge")]):
                    pass

            base = timed(forward, args.runs, device)
            cycle = timed(toggle, args.runs, device)
            with attached(model, [LoraEntry(adapter, 1.0, "merge")]) as att:
                merged = timed(forward, args.runs, device)
                backup = sum(s.backup.numel() * s.backup.element_size() for s in att._saved)
            with attached(model, [LoraEntry(adapter, 1.0, "on_the_fly")]):
                hooked = timed(forward, args.runs, device)
            lora_bytes = sum(t.numel() * t.element_size() for p in adapter.patches for t in p.tensors())
            print(f"  {weights:10s} merge+restore {cycle * 1e3:8.1f} ms (backup {backup / 2**20:.0f} MiB) | "
                  f"forward: plain {base * 1e3:7.1f} ms, merged {merged * 1e3:7.1f} ms, "
                  f"on the fly {hooked * 1e3:7.1f} ms ({(hooked / base - 1) * 100:+.1f}%, "
                  f"adapter {lora_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
