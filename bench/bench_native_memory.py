"""The native MODEL's memory: ComfyUI's partial loading ("lowvram") against the pack's block streamer.

A mid-size random DiT (default 8 blocks x width 2048, bf16, the real text widths) runs one batched
CFG call at a time in a fresh subprocess per case:

* ``resident``  -- the native model fully loaded (ComfyUI's ordinary load): the baseline;
* ``lowvram``   -- the native model loaded by ComfyUI's ModelPatcher with a weight budget of
                   ``non-block weights + N blocks``: layers that do not fit stay at the offload
                   device and are cast to the compute device on every call (``comfy_cast_weights``);
* ``streamer``  -- the pack's plain model under :class:`~stepvideo_core.offload.BlockStreamer` with the
                   same device memory: ``N - 2`` resident blocks plus its two slots.

There is no GPU here, so "the device" is the CPU, and what a GPU would move over PCIe is made a
real copy on both sides: the streamer in its ``copy`` transport (slot tensors filled with
``copy_``), ComfyUI's casts with ``copy=True`` forced in ``comfy.model_management.cast_to`` (one
new tensor per cast, as ComfyUI's cast path allocates on the CPU).  Counted per call: bytes
copied, weight bytes resident on "the device", wall time (the fastest call after the first, as the
machine may be shared), host peak above the loaded weights (VmHWM; on the CPU it includes the
emulated device copies), and whether the output equals the resident run bit for bit.

    COMFYUI_DIR=$(realpath ../shared/comfyui/ComfyUI) .venv-comfy/bin/python bench/bench_native_memory.py
    [--layers 8] [--width 2048] [--budgets 2 4 6] [--size 64x64x17] [--calls 3] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFY = ROOT.parent / "shared" / "comfyui" / "ComfyUI"

CHILD = r"""
import importlib.util, json, math, sys, time
import torch
root, tree, spec = {root!r}, {tree!r}, {spec!r}
sys.path.append(tree)
from comfy.cli_args import args
args.cpu = True
import comfy.model_management as mm
import comfy.ops

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

pkg = importlib.util.spec_from_file_location("bench_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(pkg); sys.modules["bench_pack"] = pack; pkg.loader.exec_module(pack)
import importlib
nm = importlib.import_module("bench_pack.nodes.native_model")
core = sys.modules["bench_pack.stepvideo_core"]
from bench_pack.stepvideo_core.offload import BlockStreamer
torch.set_num_threads(spec["threads"])
dtype = getattr(torch, spec["dtype"])
config = dict(num_attention_heads=spec["width"] // 128, attention_head_dim=128, in_channels=64, out_channels=64,
              num_layers=spec["layers"], patch_size=1, caption_channels=[6144, 1024])
variant = spec["variant"]
native = variant != "streamer"
model = core.build_transformer(config, device="cpu", dtype=dtype,
                               operations=nm.native_ops if native else core.ops.plain,
                               model_class=nm.StepVideoDiffusionModel if native else core.StepVideoTransformer)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
block = sum(t.numel() * t.element_size() for t in model.transformer_blocks[0].state_dict().values())
non_block = weights - spec["layers"] * block
w, h, f = spec["size"]
lat = (1, f // 17 * 3, 64, h // 16, w // 16)
x = torch.randn((2,) + lat[1:], generator=gen)                      # cond + uncond in one call
states, clip = torch.randn(2, 320, 6144, generator=gen), torch.randn(2, 77, 1024, generator=gen)
mask = torch.ones(2, 397)
sigma = 0.7
moved = [0]
out = None
base = rss("VmRSS:")
times = []
if native:
    patcher = nm.make_patcher(model, torch.device("cpu"), torch.device("cpu"))
    budget = non_block + spec["budget"] * block
    if variant == "lowvram":
        real_cast = mm.cast_to
        def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False, stream=None, r=None):
            if isinstance(weight, torch.nn.Parameter):                        # a layer's weight or bias
                moved[0] += weight.numel() * weight.element_size()
                copy = True                                                   # a real transfer, as to a GPU
            return real_cast(weight, dtype, device, non_blocking, copy, stream, r)
        mm.cast_to = cast_to
        patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
        device_bytes = patcher.model.model_loaded_weight_memory + patcher.model.model_offload_buffer_memory
        cast_layers = sum(1 for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False))
    else:
        patcher.patch_model(device_to=torch.device("cpu"))
        device_bytes, cast_layers = weights, 0
    for i in range(spec["calls"]):
        moved[0] = 0
        start = time.perf_counter()
        with torch.no_grad():
            out = patcher.model.apply_model(x.movedim(1, 2), torch.full((2,), sigma), c_crossattn=states,
                                            encoder_hidden_states_2=clip, encoder_attention_mask=mask)
        times.append(time.perf_counter() - start)
    per_call = moved[0]
    pinned = len(patcher.pinned)
else:
    keep = max(0, spec["budget"] - 2)
    streamer = BlockStreamer(model, "cpu", keep, mode="copy")
    with torch.no_grad(), streamer:
        for i in range(spec["calls"]):
            streamer.trace.clear()
            start = time.perf_counter()
            v = model(x.to(dtype), (1 - torch.full((2,), sigma)).to(dtype), states.to(dtype), clip.to(dtype),
                      mask.to(dtype))
            times.append(time.perf_counter() - start)
            per_call = sum(block for a in streamer.trace if a.kind == "fetch")
    out = x.movedim(1, 2) + v.movedim(1, 2).float() * sigma           # ComfyUI's denoised, same arithmetic
    device_bytes = non_block + (keep + min(2, spec["layers"] - keep)) * block
    cast_layers, pinned = 0, 0
print(json.dumps(dict(variant=variant, budget=spec["budget"], weights=weights, block=block, non_block=non_block,
                      device_bytes=device_bytes, moved_per_call=per_call, cast_layers=cast_layers,
                      seconds=min(times[1:] if len(times) > 1 else times), first_call=times[0],
                      host_peak_above_weights=rss("VmHWM:") - base, pinned_weights=pinned,
                      checksum=float(out.float().abs().sum()), out_head=out.float().flatten()[:64].tolist())))
"""


def measure(tree: Path, **spec) -> dict:
    code = CHILD.format(root=str(ROOT), tree=str(tree), spec=spec)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 6],
                        help="device weight budgets, in blocks on top of the non-block weights")
    parser.add_argument("--size", default="64x64x17", help="width x height x frames of the video")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", str(DEFAULT_COMFY)))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    common = dict(layers=args.layers, width=args.width, size=size, calls=args.calls, dtype=args.dtype,
                  threads=args.threads)
    tree = Path(args.comfyui)
    rows = [measure(tree, variant="resident", budget=args.layers, **common)]
    for budget in args.budgets:
        rows += [measure(tree, variant=v, budget=budget, **common) for v in ("lowvram", "streamer")]
    ref = rows[0]
    mib = lambda b: f"{b / 2 ** 20:8.1f}"  # noqa: E731
    print(f"model: {args.layers} blocks x width {args.width}, {args.dtype}; weights {ref['weights'] / 2 ** 30:.2f} GiB "
          f"(block {ref['block'] / 2 ** 20:.1f} MiB, non-block {ref['non_block'] / 2 ** 20:.1f} MiB); "
          f"video {args.size}, batch 2 (CFG); CPU, {args.threads} threads")
    print(f"{'case':<18}{'device MiB':>11}{'moved MiB/call':>15}{'cast layers':>12}{'s/call':>8}"
          f"{'host peak MiB':>14}  same output")
    for row in rows:
        same = row["out_head"] == ref["out_head"] and row["checksum"] == ref["checksum"]
        name = row["variant"] if row["variant"] == "resident" else f"{row['variant']} N={row['budget']}"
        print(f"{name:<18}{mib(row['device_bytes']):>11}{mib(row['moved_per_call']):>15}{row['cast_layers']:>12}"
              f"{row['seconds']:>8.2f}{mib(row['host_peak_above_weights']):>14}  {'bit-identical' if same else 'DIFFERS'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
