"""Time and peak memory of one Step-LLM encode (batch 2 = prompt + negative, 320 tokens) per plan.

For each config (the tiny test model and a mid-size one, 8 layers x 2048 wide by
default) and each plan, a fresh subprocess builds the model with random weights
resting on the CPU, runs one warm-up encode and then ``--runs`` timed encodes
through :func:`stepvideo_core.text.streaming.run_step_llm`, and reports:

* seconds per encode (best of the timed runs: the machine may be shared);
* peak host memory (VmHWM) above the process's level after the model was built:
  what the encode itself costs in RAM on top of the resting weights;
* on CUDA, peak GPU memory allocated (``torch.cuda.max_memory_allocated``): the
  whole model for ``resident``, about one layer for ``stream``.

Without a GPU the plans are run with the CPU as compute device, so ``stream`` and
``resident`` measure the bookkeeping of those code paths, not PCIe transfers.

    python bench/bench_text_encoder.py [--dtype bf16] [--runs 3] [--layers 8] [--width 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
from stepvideo_core import build_step_llm
from stepvideo_core.text.streaming import run_step_llm, tensor_bytes
from stepvideo_core.tiny import random_state_dict

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

dtype = getattr(torch, {dtype!r})
device = torch.device({device!r})
llm = build_step_llm({config!r}, device="meta", dtype=dtype)
llm.load_state_dict(random_state_dict({{k: v.shape for k, v in llm.state_dict().items()}}, 0, dtype), assign=True)
llm.requires_grad_(False)
ids = torch.randint(3, llm.config.padded_vocab_size, (2, 320))
ids[:, 0], ids[1, 40:] = 1, 2
run_step_llm(llm, ids, device, {mode!r})  # warm-up (kernels, allocator)
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
base = rss("VmRSS:")
times = []
for _ in range({runs}):
    start = time.perf_counter()
    out = run_step_llm(llm, ids, device, {mode!r})
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
print(json.dumps(dict(seconds=min(times), host_peak=rss("VmHWM:") - base,
                      host_peak_total=rss("VmHWM:"), weights=tensor_bytes(llm),
                      gpu_peak=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                      params=sum(p.numel() for p in llm.parameters()), finite=bool(torch.isfinite(out).all()))))
"""


def measure(config: dict, mode: str, dtype: str, device: str, runs: int) -> dict:
    """Run one case in a fresh interpreter; returns its JSON report."""
    code = CHILD.format(root=str(ROOT), config=config, mode=mode, dtype=dtype, device=device, runs=runs)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    import torch

    sys.path.insert(0, str(ROOT))
    from stepvideo_core.tiny import TINY_LLM_CONFIG

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mid = dict(hidden_size=args.width, num_layers=args.layers, num_attention_heads=args.width // 128,
               num_attention_groups=max(1, args.width // 512), ffn_hidden_size=args.width * 11 // 4,
               padded_vocab_size=65536)
    print(f"Step-LLM encode, batch 2 x 320 tokens, {args.dtype}, compute device {device}")
    print(f"{'config':<26}{'plan':<10}{'params':>10}{'weights':>10}{'s/encode':>10}{'host peak':>12}{'gpu peak':>11}")
    for name, config in (("tiny (2 x 96)", TINY_LLM_CONFIG), (f"mid ({args.layers} x {args.width})", mid)):
        for mode in ("cpu", "stream", "resident"):
            r = measure(config, mode, args.dtype, device if mode != "cpu" else "cpu", args.runs)
            gpu = "-" if r["gpu_peak"] is None else f"{r['gpu_peak'] / 2**20:.0f} MiB"
            print(f"{name:<26}{mode:<10}{r['params'] / 1e6:>9.1f}M{r['weights'] / 2**20:>7.0f} MiB"
                  f"{r['seconds']:>10.3f}{r['host_peak'] / 2**20:>8.0f} MiB{gpu:>11}"
                  + ("" if r["finite"] else "  NOT FINITE"))


if __name__ == "__main__":
    main()
