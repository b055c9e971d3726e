"""Step cache: DiT calls saved and latent error vs the uncached run, per mode and threshold, on the CPU.

    python bench/bench_cache.py [--models tiny wide] [--steps 50 15] [--seeds 2] [--size 64]

For each model (random weights, official structure) and step count (50: the base preset, cfg 9,
shift 13; 15: the Turbo preset, cfg 5, shift 17) the sampler runs uncached (the reference), then
with the adaptive cache and with the calibrated cache at three thresholds each.  The calibration
is measured as a user would: one uncached run of the same model and step count with *another*
seed and another prompt (conditioning), not the evaluated ones.  Reported: DiT calls run of the
uncached count (batched CFG: one call per step), the share saved, and the relative latent error
``||x - x_ref|| / ||x_ref||`` of the final latents (mean and max over ``--seeds`` seeds/prompts).

Random weights do not predict real-weight quality: a random DiT's velocity changes along the
schedule in a way no trained model does, so these figures show the rules' mechanics (how
many calls each threshold saves, that the error grows with it), not what a threshold costs
on Step-Video-T2V's real weights.  Calibrate and compare on real weights before trusting one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core import build_transformer  # noqa: E402
from stepvideo_core.sampling import SamplingSettings, sample  # noqa: E402
from stepvideo_core.sampling.cache import StepCache, calibration_from_stats  # noqa: E402
from stepvideo_core.tiny import TINY_DIT_CONFIG, random_state_dict  # noqa: E402

MODELS = {
    "tiny": dict(TINY_DIT_CONFIG),  # 2 blocks x 256 wide (the pack's tiny model)
    "wide": dict(num_attention_heads=8, attention_head_dim=128, num_layers=4, caption_channels=[256, 64]),
}
SCHEDULES = {50: dict(preset="Step-Video-T2V", cfg=9.0, shift=13.0),
             15: dict(preset="Step-Video-T2V-Turbo", cfg=5.0, shift=17.0)}
THRESHOLDS = {"adaptive": (0.2, 0.5, 1.0), "calibrated": (0.02, 0.05, 0.2)}


def build(config: dict):
    model = build_transformer(config, device="meta", dtype=torch.float32)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(random_state_dict(shapes, 0), assign=True)
    return model.eval()


def conditioning(config: dict, seed: int, valid: int = 20) -> dict:
    llm, clip = config.get("caption_channels", [6144, 1024])
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 77 + 32)
    mask[:, :77 + valid] = 1
    return {"encoder_hidden_states": torch.randn(1, 32, llm, generator=gen),
            "encoder_hidden_states_2": torch.randn(1, 77, clip, generator=gen),
            "encoder_attention_mask": mask}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", nargs="+", type=int, choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--seeds", type=int, default=2, help="evaluated seeds (each with its own prompt)")
    parser.add_argument("--size", type=int, default=64, help="video width = height (multiple of 16)")
    parser.add_argument("--start", type=float, default=None, help="cache start (default: the cache's)")
    parser.add_argument("--end", type=float, default=None, help="cache end (default: the cache's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    window = {k: v for k, v in (("start", args.start), ("end", args.end)) if v is not None}
    size = dict(width=args.size, height=args.size, frames=17)
    rows = []
    for name in args.models:
        config = MODELS[name]
        model = build(config)
        width = config["num_attention_heads"] * config["attention_head_dim"]
        label = f"{name} ({config['num_layers']}x{width})"
        for steps in args.steps:
            sched = SCHEDULES[steps]
            run = dict(size, steps=steps, cfg=sched["cfg"], shift=sched["shift"])
            begin = time.perf_counter()
            recorded = {}  # calibration: another seed and another prompt than the evaluated ones
            sample(model, conditioning(config, 1000), conditioning(config, 1001, valid=5),
                   settings=SamplingSettings(seed=999, **run), cache=StepCache(record_ratios=True), stats=recorded)
            calibration = calibration_from_stats(recorded, preset=sched["preset"], cfg=sched["cfg"],
                                                 shift=sched["shift"])
            cases = [("off", None)] + [(mode, t) for mode, ts in THRESHOLDS.items() for t in ts]
            results = {case: [] for case in cases}
            for seed in range(args.seeds):
                pos, neg = conditioning(config, 2 * seed), conditioning(config, 2 * seed + 1, valid=5)
                ref = sample(model, pos, neg, settings=SamplingSettings(seed=seed, **run))
                for mode, threshold in cases:
                    cache = StepCache(mode, threshold, calibration=calibration if mode == "calibrated" else None,
                                      **window)
                    stats = {}
                    out = sample(model, pos, neg, settings=SamplingSettings(seed=seed, **run), cache=cache, stats=stats)
                    error = float((out - ref).norm() / ref.norm())
                    results[(mode, threshold)].append((stats["dit_calls"], stats["dit_calls"] + stats["skipped_calls"],
                                                       error, stats["skipped_steps"]))
            for (mode, threshold), got in results.items():
                calls = sum(g[0] for g in got) / len(got)
                total = got[0][1]
                errors = [g[2] for g in got]
                rows.append((label, steps, mode, "-" if threshold is None else f"{threshold:g}",
                             f"{calls:.1f}/{total}", f"{1 - calls / total:.0%}",
                             f"{sum(errors) / len(errors):.4f}", f"{max(errors):.4f}",
                             " ".join(map(str, got[0][3][:14])) + (" ..." if len(got[0][3]) > 14 else "")))
            print(f"# {label}, {steps} steps: {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    header = ("model", "steps", "mode", "threshold", "DiT calls", "saved", "rel. err (mean)", "max",
              "skipped steps (seed 0)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    cache = StepCache(**window)
    print(f"\nwindow: start {cache.start:g}, end {cache.end:g}; calibrated at most "
          f"{StepCache('calibrated', calibration=calibration).skip_bound} skips in a row; video {args.size}x"
          f"{args.size}x17, fp32, batched CFG, {args.seeds} seeds. Random weights: the mechanics of the rules, "
          f"not real-weight quality.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
