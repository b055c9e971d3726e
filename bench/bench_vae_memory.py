"""Peak host memory of VAE decode (and encode) against the number of chunks.

Decode runs one 3-latent chunk at a time into a preallocated output, so the peak
should not grow with the video length beyond the output itself.  For 1, 2, 4 and 8
chunks a fresh subprocess builds a small random VAE (default: the parity fixture's
widths, z 8, ch 32) and its random input, records its resident memory (baseline),
resets the high-water mark (``/proc/self/clear_refs``), runs the call and reads the
peak (VmHWM; ``ru_maxrss`` when the reset is unavailable).  Printed per run: the peak
above baseline, the output's own size, and the peak minus the output ("working");
then peak(8) / peak(1) for both.  Goal: ratio <= 1.2.

Everything runs twice: with glibc's default malloc, whose dynamic mmap threshold
lets freed activation buffers stay in a fragmenting heap (the peak then wanders by
tens of MB from run to run, whatever the code does), and with
``MALLOC_MMAP_THRESHOLD_=65536``, which returns every large buffer to the system on
free and so shows what the code itself holds.

    python bench/bench_vae_memory.py [--size 128] [--ch 32] [--z 8] [--encode]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

from stepvideo_core import build_vae
from stepvideo_core.tiny import random_state_dict
config = dict(z_channels={z}, enc_ch={ch}, enc_ch_mult=(1, 1, 1, 1), dec_ch={ch}, dec_ch_mult=(1, 1, 1, 1))
model = build_vae(config, device="cpu")
model.load_state_dict(random_state_dict({{k: v.shape for k, v in model.state_dict().items()}}, seed=0))
g = torch.Generator().manual_seed(0)
n, size = {chunks}, {size}
if {encode}:
    x = torch.rand(1, 17 * n, 3, size, size, generator=g) * 2 - 1
    run = lambda: model.encode(x, generator=g)
else:
    x = torch.randn(1, 3 * n, {z}, size // 16, size // 16, generator=g)
    run = lambda: model.decode(x)
reset = True
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
except OSError:
    reset = False
base = status("VmRSS:")
start = time.perf_counter()
out = run()
seconds = time.perf_counter() - start
peak = status("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(peak=peak - base, output=out.numel() * out.element_size(), seconds=seconds, reset=reset)))
"""


ALLOCATORS = {"glibc default malloc": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def measure(chunks: int, args, env: dict) -> dict:
    code = CHILD.format(root=str(ROOT), chunks=chunks, size=args.size, ch=args.ch, z=args.z,
                        encode=args.encode, threads=args.threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="frame height = width in pixels (multiple of 16)")
    parser.add_argument("--ch", type=int, default=32, help="encoder/decoder width (multiple of 32)")
    parser.add_argument("--z", type=int, default=8, help="latent channels (8*ch must be a multiple of 32*z)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encode", action="store_true", help="measure encode instead of decode")
    args = parser.parse_args()
    what = "encode" if args.encode else "decode"
    print(f"VAE {what}, {args.size}x{args.size} frames, random weights z {args.z} ch {args.ch}, fp32, CPU")
    for name, env in ALLOCATORS.items():
        print(f"\n{name}")
        print(f"{'chunks':>6} {'frames':>6} {'peak MB':>8} {'output MB':>9} {'working MB':>10} {'seconds':>8}")
        results = {}
        for chunks in (1, 2, 4, 8):
            r = results[chunks] = measure(chunks, args, env)
            print(f"{chunks:6d} {chunks * 17:6d} {r['peak'] / 2**20:8.1f} {r['output'] / 2**20:9.1f} "
                  f"{(r['peak'] - r['output']) / 2**20:10.1f} {r['seconds']:8.2f}")
        one, eight = results[1], results[8]
        print(f"peak(8)/peak(1) = {eight['peak'] / one['peak']:.3f}   "
              f"working(8)/working(1) = {(eight['peak'] - eight['output']) / (one['peak'] - one['output']):.3f}"
              f"{'' if one['reset'] else '   (ru_maxrss: high-water mark could not be reset)'}")


if __name__ == "__main__":
    main()
