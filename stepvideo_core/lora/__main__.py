"""``python -m stepvideo_core.lora <command>``: extract a LoRA from two checkpoints, or inspect one.

``extract --base A --tuned B --rank R --out lora.safetensors``
    LoRA (plus exact differences for norms/biases) taking checkpoint A to B.
``info ADAPTER [--model DIT]``
    detected format and key groups; with ``--model`` (a DiT folder or file, read from
    headers only) the full match report against that model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from ..dtypes import DTYPES


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_core.lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_ex = sub.add_parser("extract", help="LoRA from the difference of two checkpoints")
    p_ex.add_argument("--base", required=True, help="base DiT (folder or .safetensors)")
    p_ex.add_argument("--tuned", required=True, help="fine-tuned DiT of the same architecture")
    p_ex.add_argument("--rank", type=int, required=True)
    p_ex.add_argument("--out", required=True, help="output .safetensors")
    p_ex.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype (default bf16)")
    p_ex.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where SVDs run")
    p_ex.add_argument("--svd", choices=("auto", "full", "lowrank"), default="auto",
                      help="full = exact torch.linalg.svd; lowrank = randomised (fast); auto picks per layer")
    p_info = sub.add_parser("info", help="detected format and match report of an adapter")
    p_info.add_argument("adapter")
    p_info.add_argument("--model", help="DiT to match against (folder or .safetensors)")
    args = parser.parse_args(argv)

    from ..checkpoint import CheckpointError
    from ..dit.loader import meta_transformer
    from .adapter import bind_adapter
    from .extract import extract_lora
    from .formats import LoraError, read_adapter

    try:
        if args.command == "extract":
            def progress(name, i, n):
                if i % 50 == 0 or i == n - 1:
                    print(f"  [{i + 1}/{n}] {name}", flush=True)
            info = extract_lora(args.base, args.tuned, args.rank, args.out, DTYPES[args.dtype], args.device,
                                args.svd, on_tensor=progress)
            print(f"wrote {info['out']}: {info['lowrank']} low-rank layers (rank <= {args.rank}), "
                  f"{info['diff']} exact differences, {info['identical']} identical tensors left out, "
                  f"{info['seconds']:.1f} s")
            return 0
        adapter = read_adapter(args.adapter)
        print(f"{adapter.source}: {len(adapter.tensors)} tensors, {adapter.format_name()}")
        if args.model:
            print(bind_adapter(adapter, meta_transformer(args.model)).report())
        else:
            for group in list(adapter.groups.values())[:10]:
                print(f"  {group.name}: {', '.join(sorted(group.keys))}")
        return 0
    except (CheckpointError, LoraError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
