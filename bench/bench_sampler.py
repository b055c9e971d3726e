"""Sampling step time, all blocks resident vs block-streamed, on the CPU.

    python bench/bench_sampler.py [--width 256] [--layers 8] [--dim-heads 8] [--runs 3]

A reduced-width DiT (random weights, official structure) samples one guided step;
times are the process's CPU time (min and median of interleaved runs), which a
shared machine distorts less than wall time.
"Streamed" keeps ``--resident`` blocks in place and copies every other block into
device slots before it runs (the "copy" transport: synchronous on the CPU, so this is
the overhead *without* the copy/compute overlap that CUDA streams give).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core import build_transformer  # noqa: E402
from stepvideo_core.sampling import Placement, SamplingSettings, sample  # noqa: E402
from stepvideo_core.tiny import random_state_dict  # noqa: E402


def build(heads: int, layers: int, dtype: torch.dtype):
    config = dict(num_attention_heads=heads, attention_head_dim=128, num_layers=layers, caption_channels=[256, 64])
    model = build_transformer(config, device="meta", dtype=dtype)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(dtype) for k, v in random_state_dict(shapes, 0).items()}, assign=True)
    return model.eval(), config


def conditioning(config, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 77 + 32)
    mask[:, :77 + 20] = 1
    return {"encoder_hidden_states": torch.randn(1, 32, config["caption_channels"][0], generator=gen),
            "encoder_hidden_states_2": torch.randn(1, 77, config["caption_channels"][1], generator=gen),
            "encoder_attention_mask": mask}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--heads", type=int, default=8, help="width = heads x 128")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--resident", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, config = build(args.heads, args.layers, dtype)
    pos, neg = conditioning(config, 1), conditioning(config, 2)
    common = dict(width=args.width, height=args.height, frames=args.frames, steps=1, cfg=9.0, shift=13.0, seed=0)
    tokens = args.frames // 17 * 3 * (args.height // 16) * (args.width // 16)
    block_mb = sum(t.numel() * t.element_size() for t in model.transformer_blocks[0].state_dict().values()) / 1e6
    print(f"DiT width {args.heads * 128}, {args.layers} blocks ({block_mb:.1f} MB each, {args.dtype}), "
          f"{tokens} tokens x batch 2 (CFG), torch threads {torch.get_num_threads()}")

    def once(**kw):  # CPU time of this process: other jobs on a shared machine distort wall time
        start = time.process_time()
        out = sample(model, pos, neg, settings=SamplingSettings(**common), placement=Placement(**kw))
        return time.process_time() - start, out

    streamed_kw = dict(blocks_on_device=args.resident, streamer_mode="copy")
    once(), once(**streamed_kw)  # warm-up
    resident, streamed = [], []
    for _ in range(args.runs):  # interleaved, so load from other processes hits both alike
        t, ref = once()
        resident.append(t)
        t, out = once(**streamed_kw)
        streamed.append(t)
        assert torch.equal(out, ref), "streamed output differs"
    copied = args.layers - args.resident
    print(f"process CPU time per step, {args.runs} interleaved runs each:")
    print(f"resident: min {min(resident) * 1e3:.0f} / median {statistics.median(resident) * 1e3:.0f} ms per step; "
          f"streamed ({args.resident} resident, {copied} blocks copied per step): min {min(streamed) * 1e3:.0f} / "
          f"median {statistics.median(streamed) * 1e3:.0f} ms; ratio of minima {min(streamed) / min(resident):.3f}; "
          f"outputs bit-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
