"""Compiled transformer blocks (``compile="blocks"``) against eager: step time, compile time, recompiles.

    python bench/bench_compile.py [--device cpu] [--steps 3] [--threads N] [--warm-cache] [--only tiny,wide]

Two random-weight DiTs in the official structure: the tiny test model (2 blocks x 256 wide, 2 heads; 192
video tokens here) and a wider one (4 blocks x 1024, 8 heads of 128; 384 tokens).  Each is called as the
sampler calls it at one guided step (batched CFG: batch 2, 77 CLIP + 6 LLM text tokens, the masks of two
prompts, under inference mode), by an eager copy and by a compiled copy with the same weights inside
:func:`stepvideo_core.compile.compiled_blocks`, for two "runs" (two entries of the context, as two
sampler runs are).  Variants: plain; every block streamed ("copy" transport, weights swapped in place);
run 2 with another prompt length; block Linears in scaled fp8; a rank-32 LoRA on every block Linear,
on the fly.  Per model and variant:

* ``eager`` / ``compiled``: median time of one model call over ``--steps`` interleaved calls per run
  (after each run's first, eager, call and the call that compiles), and their ratio;
* ``compile``: the duration of the call that compiled (inductor, C++ on the CPU), minus a compiled call;
* ``graphs``: graphs compiled in run 1 / run 2 (the number must not grow with blocks, steps or runs);
* ``rel err``: relative Frobenius distance of the compiled output from the eager one.

Inductor keeps compiled kernels on disk (``TORCHINDUCTOR_CACHE_DIR``): by default this script points it
at a fresh temporary folder, so the compile time is a cold one; ``--warm-cache`` uses the usual cache
(what a second ComfyUI session sees).  CPU times say how the structure behaves, not how a GPU does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "tiny": dict(num_attention_heads=2, num_layers=2, frames=17, height=128, width=128),   # 3x8x8 = 192 tokens
    "wide": dict(num_attention_heads=8, num_layers=4, frames=17, height=128, width=256),   # 3x8x16 = 384 tokens
}
VARIANTS = ("plain", "streamed", "prompt", "fp8", "lora")
LORA_RANK = 32


def config_of(name: str) -> dict:
    from stepvideo_core.tiny import TINY_DIT_CONFIG

    spec = MODELS[name]
    return dict(TINY_DIT_CONFIG, num_attention_heads=spec["num_attention_heads"], num_layers=spec["num_layers"])


def build(name: str, device, dtype, fp8_blocks: bool = False):
    """The model ``name`` with seeded random weights; ``fp8_blocks``: the blocks' Linears in scaled fp8."""
    import torch

    from stepvideo_core import build_transformer, fp8
    from stepvideo_core.tiny import random_state_dict

    operations = fp8.scaled_fp8 if fp8_blocks else None
    model = build_transformer(config_of(name), device="meta", dtype=dtype,
                              **({"operations": operations} if operations else {}))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(device, dtype) for k, v in random_state_dict(shapes, seed=1).items()}, assign=True)
    if fp8_blocks:  # as the loader quantises a full-precision file: per-channel scales
        for layer in fp8.fp8_layers(model, "transformer_blocks.").values():
            w8, scale = fp8.quantize_weight(layer.weight)
            layer.weight = torch.nn.Parameter(w8, requires_grad=False)
            layer.register_buffer("scale_weight", scale)
    return model.eval(), MODELS[name]


def inputs_for(model, spec, device, dtype, valid=(5, 2)):
    """The DiT inputs of one batched-CFG step: latents, sigma, both prompts' text states and masks."""
    import torch

    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    llm, clip = cfg.caption_dim, cfg.clip_dim
    tokens = 6
    mask = torch.zeros(2, 77 + tokens)
    for row, count in enumerate(valid):
        mask[row, :77 + count] = 1
    latents = torch.randn(2, spec["frames"] // 17 * 3, cfg.in_channels, spec["height"] // 16, spec["width"] // 16,
                          generator=gen)
    return dict(hidden_states=latents.to(device, dtype), timestep=torch.tensor([0.7, 0.7], device=device),
                encoder_hidden_states=torch.randn(2, tokens, llm, generator=gen).to(device, dtype),
                encoder_hidden_states_2=torch.randn(2, 77, clip, generator=gen).to(device, dtype),
                encoder_attention_mask=mask.to(device, dtype))


def clock(device):
    """Wall time on CUDA (after a sync); on the CPU this process's CPU time, which a busy machine disturbs less."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def call(model, inputs, device) -> tuple[float, object]:
    """(duration, output) of one model call."""
    import torch

    with torch.inference_mode():
        start = clock(device)
        out = model(**inputs)
        return clock(device) - start, out


def measure(name: str, device, dtype, steps: int) -> list[dict]:
    """The rows of one model: plain, streamed and prompt variants (see the module docstring)."""
    import contextlib

    import torch

    from stepvideo_core.compile import CompileSettings, compiled_blocks, forget_compiled
    from stepvideo_core.offload import BlockStreamer

    from stepvideo_core.lora import LoraEntry, attached, load_lora
    from stepvideo_core.tiny import write_tiny_lora

    forget_compiled()                                  # this model's graphs start from nothing (dynamo side)
    full = build(name, device, dtype)[0], build(name, device, dtype)[0]   # (eager, compiled): the same weights
    spec = MODELS[name]
    inputs = inputs_for(full[0], spec, device, dtype)
    other = inputs_for(full[0], spec, device, dtype, valid=(3, 1))   # another prompt length
    settings = CompileSettings(mode="blocks")
    tokens = spec["frames"] // 17 * 3 * (spec["height"] // 16) * (spec["width"] // 16)
    folder = tempfile.TemporaryDirectory(prefix="bench-compile-lora-")
    lora_file, _ = write_tiny_lora(Path(folder.name) / "a.safetensors", config=config_of(name), style="diffusers",
                                   keys="kohya", rank=LORA_RANK, alpha=float(LORA_RANK), dtype=torch.bfloat16)
    adapter = load_lora(lora_file, full[0])
    rows = []
    for variant in VARIANTS:
        pair = (build(name, device, dtype, True)[0], build(name, device, dtype, True)[0]) if variant == "fp8" else full
        eager_model, model = pair

        def streamers():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.inference_mode())   # as the sampler: streamer slots are inference tensors
            if variant == "lora":                      # rank-32 on every block Linear, on the fly
                for m in pair:
                    stack.enter_context(attached(m, [LoraEntry(adapter, 1.0, "on_the_fly")]))
            if variant == "streamed":                  # every block swapped in from its home copy per call
                for m in pair:
                    stack.enter_context(BlockStreamer(m, device, 0, mode="copy"))
            return stack

        graphs, eager_times, compiled_times, compile_s, err = [], [], [], None, 0.0
        for run in range(2):
            run_inputs = other if (variant == "prompt" and run == 1) else inputs
            with compiled_blocks(model, settings, device=device) as state, streamers():
                call(model, run_inputs, device)                       # each block's first call is eager
                seconds, _ = call(model, run_inputs, device)          # compiles when the graph is new
                for _ in range(steps):                                # interleaved: the same load on both
                    e, want = call(eager_model, run_inputs, device)
                    c, got = call(model, run_inputs, device)
                    eager_times.append(e)
                    compiled_times.append(c)
                    err = max(err, float((got.float() - want.float()).norm() / want.float().norm()))
            if state.fallback:
                raise SystemExit(f"compile failed: {state.fallback}")
            if run == 0 and state.graphs:
                compile_s = max(0.0, seconds - statistics.median(compiled_times))
            graphs.append(state.graphs)
        e, c = statistics.median(eager_times), statistics.median(compiled_times)
        rows.append(dict(model=f"{name} ({spec['num_layers']}x{model.config.inner_dim})", variant=variant,
                         tokens=tokens, eager_ms=1e3 * e, compiled_ms=1e3 * c, speedup=e / c, compile_s=compile_s,
                         graphs=graphs, rel_err=err))
        print(f"  {rows[-1]['model']} {variant}: eager {1e3 * e:.1f} ms, compiled {1e3 * c:.1f} ms, graphs {graphs}",
              flush=True)
    folder.cleanup()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=3, help="timed model calls per variant and run (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on the CPU, "
                                                                  "whose timings are then steadier)")
    parser.add_argument("--warm-cache", action="store_true", help="use inductor's usual on-disk cache")
    parser.add_argument("--only", default="tiny,wide", help="models to run, comma-separated (tiny, wide)")
    args = parser.parse_args(argv)
    tmp = None
    if not args.warm_cache:
        tmp = tempfile.TemporaryDirectory(prefix="bench-compile-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp.name   # before inductor reads its config: cold compiles
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"torch {torch.__version__}, {device}, {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} "
          f"threads, {'warm' if args.warm_cache else 'cold'} inductor cache; {args.steps} timed calls per variant")
    rows = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {list(MODELS)}")
        rows += measure(name, device, dtype, args.steps)
    print()
    print("| model | variant | tokens | eager ms/call | compiled ms/call | eager/compiled | compile s | "
          "graphs run 1 / run 2 | rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        compile_s = "reused" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(f"| {r['model']} | {r['variant']} | {r['tokens']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {compile_s} | {r['graphs'][0]} / {r['graphs'][1]} | {r['rel_err']:.1e} |")
    print("\nvariants: plain = all blocks resident; streamed = every block streamed (copy transport, weights "
          "swapped in place per call; slots are inference tensors: one more graph, once); prompt = run 2 with "
          "another text length (no new graph expected); fp8 = block Linears in scaled fp8 (torch._scaled_mm where "
          "this torch has it, else dequantised); lora = a rank-32 adapter on every block Linear, on the fly. "
          "compile s: the call that compiled minus a compiled call (reused: no graph was new). Times: " + ("CUDA wall time" if device.type == "cuda" else
          "CPU time of this process") + ", median of the interleaved calls.")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
