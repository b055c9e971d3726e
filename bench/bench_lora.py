"""LoRA cost on one DiT block: merge/restore time and the on-the-fly overhead per forward.

    python bench/bench_lora.py [--heads 8] [--rank 32] [--tokens 2048] [--device cpu] [--runs 3] [--threads N]
                               [--profile]

One official-structure block of width D = heads x 128 (48 heads = the released model)
with a rank-``--rank`` adapter on every Linear, named the way trainers do (split
``to_q``/``to_k``/``to_v``, mapped into the fused rows).  Reports, for full-precision
(bf16 on CUDA, fp32 on the CPU) and scaled-fp8 weights: attach+detach time in merge mode
(fp8: dequantise, merge, re-quantise, restore), and the block forward time without an
adapter, merged, and on the fly.  The extra memory of each mode is printed too: merge
keeps an exact copy of every touched weight; on the fly keeps the adapter tensors.

On the fly is timed twice in the same run: with the current hook (the layer's low-rank patches
stacked into one update added inside a GEMM) and with the previous one (each patch's full-size
delta multiplied by its scale and its strength, then added: three passes over the output per
patch), swapped in for those rows.  ``arithmetic`` is what the rank-r products add to the block's
FLOPs (its Linears and attention), the floor the on-the-fly overhead can approach.  Variants are
timed in interleaved rounds (minimum of each; CPU: process time), so a busy machine slows all alike.
``--profile`` prints the operators that take the extra time (torch.profiler), before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.op_count import OpCounter  # noqa: E402
from stepvideo_core import fp8, ops  # noqa: E402
from stepvideo_core.dit.blocks import StepVideoBlock  # noqa: E402
from stepvideo_core.dit.rope import rope_tables  # noqa: E402
from stepvideo_core.lora import LoraEntry, attached, load_lora  # noqa: E402
from stepvideo_core.lora import apply as lora_apply  # noqa: E402
from stepvideo_core.tiny import random_state_dict, write_tiny_lora  # noqa: E402


class OneBlock(torch.nn.Module):
    """A model with a single block, named like the DiT (``transformer_blocks.0``) so adapters resolve."""

    def __init__(self, dim, operations, device, dtype):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([StepVideoBlock(dim, 128, operations, device, dtype)])


class PreviousHook:
    """The on-the-fly hook as it was: per patch, the full-size delta times scale, times strength, then added."""

    def __init__(self, items):
        self.items, self.cache, self.stacked = items, {}, {}

    def __call__(self, module, args, output):
        x = args[0]
        for index, (patch, strength) in enumerate(self.items):
            key = (index, x.device, x.dtype)
            if key not in self.cache:
                self.cache[key] = tuple(t.to(device=x.device, dtype=x.dtype) for t in patch.tensors())
            delta = patch.output_delta(module, x, self.cache[key]).to(output.dtype) * strength
            slot = patch.target.slot
            if slot is None:
                output = output + delta
            else:
                slot.of_output(output).add_(delta.unflatten(-1, (-1, slot.head_dim)))
        return output


@contextlib.contextmanager
def previous_hook():
    saved = lora_apply._Hook
    lora_apply._Hook = PreviousHook
    try:
        yield
    finally:
        lora_apply._Hook = saved


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def timed(fn, runs, device):
    fn()
    times = []
    for _ in range(runs):
        start = clock(device)
        fn()
        times.append(clock(device) - start)
    return min(times)


def interleaved(variants: dict, runs: int, device) -> dict:
    """Minimum time of each variant (name -> (enter, fn)) over ``runs`` rounds that run every variant once."""
    best = {}
    for round_ in range(runs + 1):  # round 0 warms up
        for name, (context, fn) in variants.items():
            with context():
                fn()  # per-round warm-up inside the context (device copies of adapters, first-call work)
                start = clock(device)
                fn()
                spent = clock(device) - start
            if round_:
                best[name] = min(best.get(name, spent), spent)
    return best


def block_flops(dim, tokens, context_tokens):
    """Multiply-adds x 2 of one block at these sizes: its Linears and the two attentions."""
    linear = tokens * (3 * dim * dim + dim * dim + dim * dim + 4 * dim * dim * 2) + context_tokens * 2 * dim * dim
    attention = 2 * tokens * tokens * dim + 2 * tokens * context_tokens * dim
    return 2 * (linear + attention)


def lora_flops(adapter, tokens, context_tokens):
    """FLOPs the rank-r products add: (x A^T) B^T for each patch (the context rows for attn2.wkv)."""
    total = 0
    for patch in adapter.patches:
        if patch.kind != "lowrank":
            continue
        rows = context_tokens if patch.target.module.endswith("attn2.wkv") else tokens
        out, inp = patch.up.shape[0], patch.down.reshape(patch.rank, -1).shape[1]
        total += 2 * rows * patch.rank * (inp + out)
    return total


def ops_of(forward) -> int:
    with OpCounter() as counter:
        forward()
    return counter.total


def profile_extra(forward, label):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        forward()
    print(f"    {label}: top operators by self time")
    for line in prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8).splitlines()[3:11]:
        print("      " + line[:120])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the on-the-fly forward")
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

            cycle = timed(toggle, args.runs, device)
            with attached(model, [LoraEntry(adapter, 1.0, "merge")]) as att:
                backup = sum(s.backup.numel() * s.backup.element_size() for s in att._saved)

            def with_adapter(mode, hook=contextlib.nullcontext):
                @contextlib.contextmanager
                def context():
                    with hook(), attached(model, [LoraEntry(adapter, 1.0, mode)]):
                        yield
                return context

            best = interleaved({"plain": (contextlib.nullcontext, forward),
                                "merged": (with_adapter("merge"), forward),
                                "on the fly": (with_adapter("on_the_fly"), forward),
                                "before": (with_adapter("on_the_fly", previous_hook), forward)}, args.runs, device)
            launches = {"plain": ops_of(forward)}
            with attached(model, [LoraEntry(adapter, 1.0, "on_the_fly")]):
                now = forward()
                launches["now"] = ops_of(forward)
            with previous_hook(), attached(model, [LoraEntry(adapter, 1.0, "on_the_fly")]):
                then = forward()
                launches["before"] = ops_of(forward)
            with attached(model, [LoraEntry(adapter, 1.0, "merge")]):
                reference = forward()
            base = best["plain"]
            lora_bytes = sum(t.numel() * t.element_size() for p in adapter.patches for t in p.tensors())
            arithmetic = lora_flops(adapter, x.shape[1], context.shape[1]) / block_flops(dim, x.shape[1],
                                                                                          context.shape[1])
            err = lambda y: ((y.float() - reference.float()).norm() / reference.float().norm()).item()  # noqa: E731
            print(f"  {weights:10s} merge+restore {cycle * 1e3:8.1f} ms (backup {backup / 2**20:.0f} MiB) | "
                  f"forward: plain {base * 1e3:7.1f} ms, merged {best['merged'] * 1e3:7.1f} ms, "
                  f"on the fly {best['on the fly'] * 1e3:7.1f} ms ({(best['on the fly'] / base - 1) * 100:+.1f}%; "
                  f"before {best['before'] * 1e3:.1f} ms, {(best['before'] / base - 1) * 100:+.1f}%; "
                  f"arithmetic {arithmetic * 100:+.1f}%; adapter {lora_bytes / 2**20:.1f} MiB)")
            print(f"  {'':10s} on the fly vs merged: relative difference {err(now):.2e} now, {err(then):.2e} before; "
                  f"aten ops per block forward (GPU kernels): plain {launches['plain']}, on the fly {launches['now']} "
                  f"(before {launches['before']})")
            if args.profile:
                with attached(model, [LoraEntry(adapter, 1.0, "on_the_fly")]):
                    forward()
                    profile_extra(forward, "on the fly, now")
                with previous_hook(), attached(model, [LoraEntry(adapter, 1.0, "on_the_fly")]):
                    forward()
                    profile_extra(forward, "on the fly, before")


if __name__ == "__main__":
    main()
