"""Command line: ``python -m stepvideo_core <command>``.

``check``  loads a DiT through the real loader and runs one forward pass.  With
           no ``--transformer`` it first writes a tiny random DiT in the official
           folder layout to a temporary folder: a smoke test of the install,
           not a real model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def smoke_inputs(model, frames: int = 3, height: int = 4, width: int = 6, text_tokens: int = 12,
                 seed: int = 0) -> dict:
    """Random DiT inputs sized for ``model``'s config (CFG-sized batch of 2, realistic mask)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    clip_tokens = 77 if cfg.clip_dim else 0
    mask = torch.zeros(2, clip_tokens + text_tokens)
    mask[0, :clip_tokens + text_tokens] = 1
    mask[1, :clip_tokens + text_tokens // 2] = 1
    inputs = dict(hidden_states=torch.randn(2, frames, cfg.in_channels, height, width, generator=gen),
                  timestep=torch.tensor([0.0, 0.5]),
                  encoder_hidden_states=torch.randn(2, text_tokens, cfg.caption_dim, generator=gen),
                  encoder_attention_mask=mask)
    if cfg.clip_dim:
        inputs["encoder_hidden_states_2"] = torch.randn(2, clip_tokens, cfg.clip_dim, generator=gen)
    return inputs


def check(transformer: Optional[str], dtype: torch.dtype, device: str, attention: str) -> int:
    """Load + one forward; prints what happened. Returns a process exit code."""
    from . import load_transformer
    from .tiny import write_tiny_dit

    with tempfile.TemporaryDirectory(prefix="stepvideo-check-") as tmp:
        if transformer is None:
            print("No --transformer given: writing a tiny random DiT in the official folder layout "
                  "(a smoke test of the install, not real weights).")
            transformer = str(write_tiny_dit(Path(tmp) / "stepvideo-t2v"))
            files = sorted(p.name for p in (Path(transformer) / "transformer").iterdir())
            print(f"  wrote {transformer}/transformer: {', '.join(files)}")
        start = time.perf_counter()
        model = load_transformer(transformer, dtype=dtype, device=device, attention=attention)
        cfg = model.config
        print(f"  loaded {len(model.state_dict())} tensors ({cfg.num_layers} blocks, width {cfg.inner_dim}, "
              f"{model.num_parameters() / 1e6:.1f} M parameters) as {dtype} on {device} "
              f"in {time.perf_counter() - start:.2f} s")
        inputs = {k: v.to(device) for k, v in smoke_inputs(model).items()}
        start = time.perf_counter()
        with torch.no_grad():
            velocity = model(**inputs)
        finite = bool(torch.isfinite(velocity).all())
        print(f"  forward {list(inputs['hidden_states'].shape)} -> velocity {list(velocity.shape)} "
              f"({'finite' if finite else 'NOT FINITE'}) in {time.perf_counter() - start:.2f} s")
    print("OK" if finite else "FAILED: non-finite output")
    return 0 if finite else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="load a DiT (tiny random one by default) and run one forward")
    p_check.add_argument("--transformer", help="stepvideo-t2v folder, its transformer/ folder or a .safetensors file")
    p_check.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p_check.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_check.add_argument("--attention", default="sdpa")
    args = parser.parse_args(argv)
    from .attention import AttentionBackendError
    from .checkpoint import CheckpointError

    try:
        if args.command == "check":
            return check(args.transformer, DTYPES[args.dtype], args.device, args.attention)
    except (CheckpointError, AttentionBackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
