"""Per-forward overheads of the DiT that were removed, measured before/after in one run (CPU).

    python bench/bench_overheads.py [--frames 36 --height 34 --width 62] [--heads 2] [--steps 50] [--threads N]

Rows (CPU numbers are structure, not speed claims):

1. RoPE tables: the time of one build at the latent grid given (the release's 204-frame 544x992 grid by
   default: 36 x 34 x 62 = 75,888 tokens) and how many builds a run of ``--steps`` batched-CFG steps makes
   (before: one per forward; now: one per run).
2. RoPE rotation of one block's q (``--heads`` heads of 128 at that grid, bf16): the previous gather
   (``x[..., partner]``, a permuted copy of q) against the strided rotation, time and the memory each
   allocates; results bit-identical (checked).  On the CPU the strided products (runs of 16-32
   channels) vectorise worse than the gather; on a GPU they save one full pass and a full-size copy.
3. Host reads of device values per DiT forward (on a GPU each one waits for the GPU): counted on the
   tiny model with the sampler's known text length, and without it (the one fallback left).
4. Attention backend resolutions (``importlib`` look-ups) per sampler run with ``attention="auto"``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core import attention as attn  # noqa: E402
from stepvideo_core import build_transformer  # noqa: E402
from stepvideo_core.dit import model as dit_model  # noqa: E402
from stepvideo_core.dit.rope import apply_rope, rope_tables  # noqa: E402
from stepvideo_core.sampling import SamplingSettings, sample  # noqa: E402
from stepvideo_core.tiny import TINY_DIT_CONFIG, tiny_dit_state_dict  # noqa: E402


def gathered(x, tables):
    cos, signed_sin, partner = tables
    return (x * cos[None, :, None, :]).add_(x[..., partner].mul_(signed_sin[None, :, None, :]))


def best(fn, runs=3):
    fn()
    times = []
    for _ in range(runs):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def allocations(fn):
    """Bytes of every new tensor the aten operations of ``fn`` allocate (views of their inputs left out)."""
    sizes = []

    class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
                sizes.append(out.untyped_storage().nbytes())
            return out

    with Allocations():
        fn()
    return sizes


def tiny():
    model = build_transformer(TINY_DIT_CONFIG, device="meta", dtype=torch.float32)
    model.load_state_dict(tiny_dit_state_dict(TINY_DIT_CONFIG, 0), assign=True)
    return model.eval()


def conditioning(seed, valid):
    llm, clip = TINY_DIT_CONFIG["caption_channels"]
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 83)
    mask[:, :77 + valid] = 1
    return {"encoder_hidden_states": torch.randn(1, 6, llm, generator=gen),
            "encoder_hidden_states_2": torch.randn(1, 77, clip, generator=gen), "encoder_attention_mask": mask}


class HostReads:
    """Counts int()/float()/bool()/.item()/.tolist() on tensors while on."""

    NAMES = ("__int__", "__float__", "__bool__", "item", "tolist")

    def __init__(self):
        self.on, self.count, self.saved = False, 0, {}

    def __enter__(self):
        for name in self.NAMES:
            real = self.saved[name] = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                self.count += self.on
                return _real(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=36)
    parser.add_argument("--height", type=int, default=34)
    parser.add_argument("--width", type=int, default=62)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = (args.frames, args.height, args.width)
    tokens = args.frames * args.height * args.width
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, grid {grid} = {tokens} tokens")

    cpu = torch.device("cpu")
    build = best(lambda: rope_tables(*grid, torch.bfloat16, cpu), runs=2)
    print(f"1. RoPE tables: {build * 1e3:.0f} ms per build; a {args.steps}-step run builds them "
          f"{args.steps} times before ({args.steps * build:.1f} s), once now ({build:.2f} s)")

    tables = rope_tables(*grid, torch.bfloat16, cpu)
    q = torch.randn(1, tokens, args.heads, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(apply_rope(q, tables), gathered(q, tables))
    t_before, t_now = best(lambda: gathered(q, tables)), best(lambda: apply_rope(q, tables))
    before, now = allocations(lambda: gathered(q, tables)), allocations(lambda: apply_rope(q, tables))
    mib = lambda sizes: f"{sum(sizes) / 2**20:.0f} MiB in {len(sizes)}"  # noqa: E731
    print(f"2. RoPE rotation of q [{tokens}, {args.heads}, 128] bf16 ({q.nbytes / 2**20:.0f} MiB): gather "
          f"{t_before * 1e3:.1f} ms -> strided {t_now * 1e3:.1f} ms; allocated {mib(before)} tensors (largest "
          f"besides the output {sorted(before)[-2] / 2**20:.0f} MiB) -> {mib(now)} (largest besides the output "
          f"{sorted(now)[-2] / 2**20:.0f} MiB); bit-identical")

    model = tiny()
    pos, neg = conditioning(1, 5), conditioning(2, 2)
    inputs = {k: torch.cat([pos[k], neg[k]]) for k in pos}
    x = dict(hidden_states=torch.randn(2, 3, 64, 3, 2), timestep=torch.tensor([0.4, 0.4]), **inputs)
    longest = dit_model.longest_context(inputs["encoder_attention_mask"])
    with torch.no_grad(), HostReads() as reads:
        model(**x)
        model.clear_rope_cache()
        reads.on = True
        model(**x)
        without = reads.count
        reads.count = 0
        model.clear_rope_cache()
        model(**x, context_length=longest)
        given = reads.count
    print(f"3. host reads of device values per forward: 4 before (lengths.max() + 3 x positions.max()), "
          f"{without} now without the known text length, {given} with it (what the sampler passes)")

    looked = []
    real = attn._module_available
    attn._module_available = lambda name: looked.append(name) or real(name)
    try:
        model.attention_backend = "auto"
        sample(model, pos, neg, settings=SamplingSettings(width=32, height=48, frames=17, steps=3, cfg=5.0, shift=13.0))
    finally:
        attn._module_available = real
    blocks = len(model.transformer_blocks)
    print(f"4. attention 'auto' look-ups in a 3-step run of {blocks} blocks: {2 * blocks * 3} before "
          f"(2 per self-attention call), {len(looked)} now (once per model and device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
