"""Peak host memory while loading a DiT checkpoint: ours vs the naive load.

Writes a mid-size random DiT (bf16 on disk, official sharded layout) to a temp
folder, then in a fresh subprocess per case measures the peak resident memory
(VmHWM) above the process's baseline, divided by the model's size in the target
dtype, right after loading and again after every weight has been read once.
1.0 means "the model and nothing else"; the naive path (read every shard into a
state dict, then load_state_dict into a materialised model) holds the model
twice.  When the file dtype is the target dtype, safetensors hands out
copy-on-write mappings of the file, so pages arrive on first use.

    python bench/bench_dit_load.py [--layers 8] [--heads 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import stepvideo_core
from stepvideo_core.dit.loader import find_transformer_files
dtype = getattr(torch, {dtype!r})
base = rss("VmRSS:")
start = time.perf_counter()
if {mode!r} == "ours":
    model = stepvideo_core.load_transformer({path!r}, dtype=dtype)
else:
    from safetensors.torch import load_file
    index, config = find_transformer_files({path!r})
    state = {{}}
    for f in index.files:
        state.update(load_file(str(f)))
    cfg = json.load(open(config))
    model = stepvideo_core.build_transformer(cfg, device="cpu", dtype=dtype)
    model.load_state_dict(state)
    del state
seconds = time.perf_counter() - start
size = sum(p.numel() * p.element_size() for p in model.parameters())
peak_load = rss("VmHWM:") - base
touched = sum(float(p.sum()) for p in model.parameters())  # read every weight once (pages in mmap-backed ones)
print(json.dumps(dict(peak=peak_load, peak_used=rss("VmHWM:") - base, size=size, seconds=seconds)))
"""


def measure(path: Path, dtype: str, mode: str) -> dict:
    code = CHILD.format(root=str(ROOT), path=str(path), dtype=dtype, mode=mode)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from stepvideo_core.tiny import tiny_dit_state_dict, write_dit_checkpoint

    config = dict(num_layers=args.layers, num_attention_heads=args.heads, caption_channels=[1024, 256])
    with tempfile.TemporaryDirectory() as tmp:
        state = tiny_dit_state_dict(config, dtype=torch.bfloat16)
        path = write_dit_checkpoint(state, config, Path(tmp) / "stepvideo-t2v", shards=4)
        del state
        print(f"DiT {args.layers} blocks x width {args.heads * 128}, bf16 on disk in 4 shards")
        print(f"{'dtype':8} {'loader':6} {'model MB':>9} {'load peak MB':>12} {'ratio':>6} "
              f"{'after use MB':>12} {'ratio':>6} {'seconds':>8}")
        for dtype in ("bfloat16", "float32"):
            for mode in ("ours", "naive"):
                r = measure(path, dtype, mode)
                print(f"{dtype:8} {mode:6} {r['size'] / 2**20:9.0f} {r['peak'] / 2**20:12.0f} "
                      f"{r['peak'] / r['size']:6.2f} {r['peak_used'] / 2**20:12.0f} "
                      f"{r['peak_used'] / r['size']:6.2f} {r['seconds']:8.2f}")


if __name__ == "__main__":
    main()
