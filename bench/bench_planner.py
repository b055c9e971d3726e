"""Memory plans for the released 30B DiT at the official size, for common GPU sizes.

    python bench/bench_planner.py [--json] [--model t2v|ti2v] [--ranks 1 2 4]

Pure arithmetic (no GPU, no weights): prints what the sampler's "auto" would choose.  ``--model ti2v``
plans the Step-Video-TI2V transformer (128-channel patch embed, motion-score embedder, the image
condition held per step) at its official 102 frames (and 51).  ``--ranks``: plans for one GPU of a
Ulysses sequence-parallel run over that many GPUs (each holds its share of the tokens; 1 = one GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core.dit import StepVideoDiTConfig  # noqa: E402
from stepvideo_core.offload.planner import GiB, PlanInputs, auto_plan  # noqa: E402

CASES = {"t2v": [(992, 544, 204), (992, 544, 51)], "ti2v": [(992, 544, 102), (992, 544, 51)]}
GPUS = (24, 48, 80)
FORMATS = ("bf16", "fp8_scaled")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the full plans as JSON")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--model", choices=sorted(CASES), default="t2v", help="the released T2V or TI2V DiT")
    parser.add_argument("--free-gib", type=float, nargs="+", default=list(GPUS),
                        help="free VRAM to plan for, GiB (default: 24 48 80)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1],
                        help="GPUs sharing the video's tokens (Ulysses), planned per GPU (default: 1)")
    args = parser.parse_args()
    config = StepVideoDiTConfig(use_additional_conditions=args.model == "ti2v").to_dict()
    rows = []
    for width, height, frames in CASES[args.model]:
        for fmt in FORMATS:
            for ranks in args.ranks:
                for gib in args.free_gib:
                    plan = auto_plan(PlanInputs(width, height, frames, weight_format=fmt, attention=args.attention,
                                                config=config, sequence_parallel=ranks), free_bytes=int(gib * GiB))
                    rows.append(dict(size=f"{height}x{width}x{frames}", weights=fmt, gpu_gib=gib, ranks=ranks,
                                     **plan))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'size':>14} {'weights':>10} {'ranks':>5} {'GPU':>5} {'blocks':>7} {'CFG':>10} {'peak GiB':>9} "
          f"{'activ. GiB':>10} {'fits':>5}")
    for r in rows:
        print(f"{r['size']:>14} {r['weights']:>10} {r['ranks']:>5} {r['gpu_gib']:>4g}G {r['blocks_on_device']:>4}/48 "
              f"{'batched' if r['batch_cfg'] else 'one-by-one':>10} {r['peak_bytes'] / GiB:>9.1f} "
              f"{r['items']['activations'] / GiB:>10.1f} {str(r['fits']):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
