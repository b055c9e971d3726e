"""The pure half of ``bench/gpu_check.py``: formulas, sizes, the time estimate, row checks and reports.

Nothing here touches a device (and the formulas and checks need no torch), so every number the
GPU check prints can be checked by hand and by the normal test suite (tests/bench/test_gpu_check.py):

* FLOPs of one DiT block (:func:`stepvideo_core.flops.block_flops`) and of one Step-LLM layer (:func:`llm_layer_flops`);
* the sizes each mode runs at (:class:`Spec`, :func:`make_spec`);
* the up-front time estimate (:func:`estimate`) at :data:`ASSUMED_TFLOPS` and :data:`ASSUMED_H2D`;
* the row checks (:func:`error_check`, :func:`planner_check`, :func:`rss_check`, ...) and the
  scaling of a planner row measured with a few blocks to the 48 of the release (:func:`scale_to_release`);
* the report: text rows, summary, markdown and exit code (:func:`render_section_text`,
  :func:`render_summary`, :func:`render_markdown`, :func:`exit_code`).

The planner it compares against is imported, not restated (``stepvideo_core.offload.planner`` is
itself torch-free).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stepvideo_core.offload.planner import (ATTENTION_EXTRA_UNITS, ATTENTION_LIVE_UNITS,  # noqa: E402
                                            CONTEXT_COPIES, DEFAULT_CONFIG, FP8_MATMUL_EXTRA_UNITS, LLM_TOKENS,
                                            PEAK_UNITS, latent_tokens)
from stepvideo_core.flops import TEXT_TOKENS, block_flops  # noqa: E402,F401  (one formula: the core's)

GiB = 1 << 30
MiB = 1 << 20
RELEASE_LAYERS = DEFAULT_CONFIG["num_layers"]   # 48

# --------------------------------------------------------------------------- budget assumptions

ASSUMED_TFLOPS = 400.0   # bf16 rate the budget assumes (H100/H200 reach ~750-800 on large matmuls: margin)
ASSUMED_H2D = 20e9       # host -> device bytes/s assumed for pinned copies (nodes/routes.py assumes the same)
PAGEABLE_H2D = 10e9      # host -> device bytes/s assumed for pageable copies (Step-LLM streaming)
PIN_RATE = 4e9           # bytes/s assumed for pinning host memory (cudaHostAlloc + copy), once per tensor
STARTUP_S = 20.0         # python + torch import + CUDA context + the first kernels, assumed
BUDGET_S = {"quick": 180.0, "full": 480.0}  # what the issue allows on one H100/H200-class GPU

# --------------------------------------------------------------------------- correctness bounds

# Mirrored from tests/core/test_fp8.py (``MODES``, the (mode, bound) pairs of its layer and tiny-DiT
# error tests): relative Frobenius error of a block output.  tests/bench/test_gpu_check.py imports
# MODES and fails when the two drift apart.
FP8_BOUNDS = {"matmul": 0.05, "dequantize": 0.04}
# tests/core/test_attention.py has no numeric bound for SageAttention or flash-attn (it runs
# stand-ins on the CPU). SageAttention quantises q/k to int8 and p/v to fp8, so it gets the
# bound of the pack's other 8-bit arithmetic (fp8 matmul); flash-attn is a bf16 kernel like
# SDPA's own, so it gets bf16 noise level (the README's bf16 model is 0.7 % from fp32).
ATTENTION_BOUNDS = {"sdpa": 0.0, "sageattention": FP8_BOUNDS["matmul"], "flash_attn": 0.02}
# Compiled blocks (stepvideo_core.compile, inductor): the bf16 block fused by inductor rounds once where eager
# rounds every op to bf16, so bf16 noise level like flash-attn; the fp8 matmul block compiled keeps fp8's bound
# (its per-token activation quantisation flips e4m3 steps on any rounding difference, eager included).
COMPILE_BOUNDS = {"bf16": ATTENTION_BOUNDS["flash_attn"], "fp8 matmul": FP8_BOUNDS["matmul"]}
COMPILE_ROW_S = 25.0     # seconds a compiled-block row is assumed to take to compile (dynamo + inductor + Triton)
PLANNER_UNDERESTIMATE = 0.10      # a row fails when predicted < (1 - this) x measured
RSS_GROWTH_TOLERANCE = 256 * MiB  # host RSS may grow this much from the end of run 1 to the end of run 3
STATUSES = ("ok", "info", "warn", "skip", "FAIL", "error")
FAILING = ("FAIL", "error")
SECTIONS = ("environment", "compute", "streaming", "planner", "vae_text")
SECTION_TITLES = {
    "environment": "5. Environment",
    "compute": "1. Compute: one DiT block",
    "streaming": "2. Streaming: resident vs streamed blocks",
    "planner": "3. Planner: predicted vs measured peak",
    "vae_text": "4. VAE decode and Step-LLM layer streaming",
}


# --------------------------------------------------------------------------- FLOPs


def llm_layer_flops(tokens: int, batch: int, hidden: int, heads: int, groups: int, ffn_inner: int) -> int:
    """FLOPs of one Step-LLM layer on ``batch`` x ``tokens``: the four Linears and the attention.

    wqkv d -> d + 2 * (d / heads) * groups, wo d -> d, w1 d -> 2 f, w2 f -> d; attention QK^T and PV
    over all (non-causal count) token pairs: 4 * tokens^2 * d per sample.
    """
    kv = 2 * (hidden // heads) * groups
    per_token = hidden * (hidden + kv) + hidden * hidden + hidden * 2 * ffn_inner + ffn_inner * hidden
    return batch * (2 * tokens * per_token + 4 * tokens * tokens * hidden)


def tflops(flops: float, seconds: Optional[float]) -> Optional[float]:
    """Achieved TFLOP/s, or None without a time."""
    if not seconds or seconds <= 0:
        return None
    return flops / seconds / 1e12


def rate_note(gb_per_s: Optional[float]) -> str:
    return "n/a" if gb_per_s is None else f"{gb_per_s:.1f} GB/s"


# --------------------------------------------------------------------------- memory formulas


def hidden_unit(tokens: int, dim: int, batch: int = 1, item: int = 2) -> int:
    """Bytes of one copy of the hidden states (the planner's U = B * L * D * a)."""
    return batch * tokens * dim * item


def planner_block_units(weight_format: str, attention: str = "sdpa", item: int = 2) -> float:
    """Hidden-state copies the planner assumes alive at a block's peak (its PEAK_UNITS rule)."""
    peak = PEAK_UNITS[item] + (FP8_MATMUL_EXTRA_UNITS if weight_format == "fp8_scaled" else 0.0)
    return max(peak, ATTENTION_LIVE_UNITS + ATTENTION_EXTRA_UNITS.get(attention, 0.0))


def planner_block_peak(tokens: int, dim: int, weight_format: str, attention: str = "sdpa", batch: int = 1,
                       item: int = 2) -> int:
    """Bytes the planner expects alive at one block's peak, the block input included: its units of
    hidden-state copies, its copies of the text context (CONTEXT_COPIES x S tokens: the context's
    k|v projection lives in them) and, with fp8 weights, its workspace (two dequantised copies of
    the largest Linear, 4 d x d).  The RoPE tables are not part of a block call."""
    units = planner_block_units(weight_format, attention, item) * hidden_unit(tokens, dim, batch, item)
    context = CONTEXT_COPIES * hidden_unit(TEXT_TOKENS, dim, batch, item)
    workspace = 2 * 4 * dim * dim * item if weight_format == "fp8_scaled" else 0
    return int(units + context + workspace)


def blocks_for(choice: str, layers: int) -> int:
    """Resident block count for a grid choice: "0", "some" (half) or "all"."""
    return {"0": 0, "some": layers // 2, "all": layers}[choice]


def scale_to_release(measured: int, resident_built: int, resident_release: int, block_bytes: int) -> int:
    """A peak measured on a model with fewer blocks, as the 48-block release would have it.

    Only resident weights scale with the block count (linearly, ``block_bytes`` each, the real
    block's tensor bytes); the non-block weights, the (at most two) streaming slots and every
    activation are the same for 4 blocks as for 48, because blocks run one after another.
    """
    return int(measured + (resident_release - resident_built) * block_bytes)


# --------------------------------------------------------------------------- checks


def rel_ok(err: Optional[float], bound: float) -> bool:
    """``err`` within ``bound`` (NaN or None never is)."""
    return err is not None and math.isfinite(err) and err <= bound


def error_check(err: Optional[float], bound: float) -> str:
    return "ok" if rel_ok(err, bound) else "FAIL"


def planner_check(predicted: int, measured: Optional[int], tolerance: float = PLANNER_UNDERESTIMATE) -> tuple:
    """(status, ratio predicted/measured): FAIL when the prediction is more than ``tolerance`` too low."""
    if not measured:
        return "skip", None
    ratio = predicted / measured
    return ("ok" if predicted >= (1.0 - tolerance) * measured else "FAIL"), ratio


def rss_check(samples: list, tolerance: int = RSS_GROWTH_TOLERANCE) -> tuple:
    """(status, growth bytes) for RSS ``samples`` = [before run 1, after run 1, ..., after run n].

    Run 1 may allocate for good (the streamer pins the host copies once); later runs must not:
    growth = after run n - after run 1.
    """
    if len(samples) < 3 or any(s is None for s in samples):
        return "skip", None
    growth = samples[-1] - samples[1]
    return ("ok" if growth <= tolerance else "FAIL"), growth


def hidden_fraction(resident_s: float, streamed_s: float, copy_s: float) -> Optional[float]:
    """Fraction of the copy time that overlapped compute: 1 - (streamed - resident) / copy, in [0, 1]."""
    if copy_s is None or copy_s <= 0 or resident_s is None or streamed_s is None:
        return None
    exposed = max(0.0, streamed_s - resident_s)
    return max(0.0, min(1.0, 1.0 - exposed / copy_s))


def median(values: Iterable[float]) -> Optional[float]:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


# --------------------------------------------------------------------------- sizes


@dataclass
class Spec:
    """Everything a run measures; derived once from the command line (see :func:`make_spec`)."""

    name: str
    dit_config: dict                   # build_transformer config of the model the check builds
    compute_sizes: list                # (width, height, frames) of the one-block forwards
    compute_runs: int                  # timed runs per variant (after one warm-up)
    stream_size: tuple                 # (width, height, frames) of the streaming step
    stream_batch: int
    stream_passes: int                 # model calls per streamer run
    stream_runs: int                   # streamer runs (RSS is read after each)
    planner_size: tuple                # (width, height) of the planner grid
    planner_grid: list                 # dicts: frames, weight_format, blocks ("0"/"some"/"all"), batched
    vae_config: Optional[dict]         # None = the release VAE
    vae_size: tuple                    # (height, width) in pixels of the decoded chunk
    vae_runs: int
    llm_config: dict
    llm_runs: int
    llm_batch: int = 2
    llm_tokens: int = LLM_TOKENS
    budget_s: Optional[float] = None
    compile_variants: tuple = ("bf16",)  # compiled-block rows at the first compute size (COMPILE_BOUNDS keys)

    @property
    def dim(self) -> int:
        return self.dit_config["num_attention_heads"] * self.dit_config["attention_head_dim"]

    @property
    def layers(self) -> int:
        return self.dit_config["num_layers"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RELEASE_CHECK_DIT = dict(DEFAULT_CONFIG, num_layers=4)
RELEASE_LLM = dict(hidden_size=6144, num_attention_heads=48, num_attention_groups=8, ffn_hidden_size=16896,
                   padded_vocab_size=1024)  # the embedding table is not what is measured: 1024 rows, not 65536


def planner_grid(frames: Iterable[int], formats=("bf16", "fp8_scaled"), blocks=("0", "some", "all"),
                 batched=(True, False)) -> list:
    return [dict(frames=f, weight_format=w, blocks=b, batched=c)
            for f in frames for w in formats for b in blocks for c in batched]


def make_spec(tiny: bool, quick: bool) -> Spec:
    """The sizes of one mode.  Real widths (the default) or ``tiny`` ones (width 256, CPU-sized)."""
    if tiny:
        from stepvideo_core.tiny import TINY_DIT_CONFIG, TINY_LLM_CONFIG, TINY_VAE_CONFIG

        small, large = (128, 64, 17), (128, 64, 34)            # 96 and 192 tokens
        frames = (17, 34)                                      # planner at 256x128: 384 and 768 tokens
        grid = planner_grid(frames)
        if quick:  # every value of every axis once
            grid = [dict(frames=17, weight_format="bf16", blocks="0", batched=True),
                    dict(frames=17, weight_format="bf16", blocks="some", batched=False),
                    dict(frames=17, weight_format="fp8_scaled", blocks="all", batched=True),
                    dict(frames=34, weight_format="fp8_scaled", blocks="0", batched=True),
                    dict(frames=34, weight_format="bf16", blocks="all", batched=False)]
        return Spec(name="tiny-quick" if quick else "tiny",
                    dit_config=dict(TINY_DIT_CONFIG, num_layers=4), compute_sizes=[small, large],
                    compute_runs=1 if quick else 2, stream_size=small, stream_batch=2,
                    stream_passes=2 if quick else 3, stream_runs=3, planner_size=(256, 128), planner_grid=grid,
                    vae_config=dict(TINY_VAE_CONFIG), vae_size=(64, 64), vae_runs=1,
                    llm_config=dict(TINY_LLM_CONFIG, num_layers=4), llm_runs=1 if quick else 2,
                    compile_variants=("bf16", "fp8 matmul"))
    official = [(992, 544, 51), (992, 544, 204)]               # 18,972 and 75,888 tokens
    if quick:  # every axis value at 51 frames; at 204 (where 24-48 GB cards stream) the rows that matter most
        grid = [dict(frames=51, weight_format="bf16", blocks="0", batched=True),
                dict(frames=51, weight_format="fp8_scaled", blocks="some", batched=True),
                dict(frames=51, weight_format="bf16", blocks="all", batched=False),
                dict(frames=204, weight_format="bf16", blocks="0", batched=True),
                dict(frames=204, weight_format="bf16", blocks="some", batched=True),
                dict(frames=204, weight_format="bf16", blocks="all", batched=True),
                dict(frames=204, weight_format="fp8_scaled", blocks="0", batched=True),
                dict(frames=204, weight_format="fp8_scaled", blocks="all", batched=True),
                dict(frames=204, weight_format="fp8_scaled", blocks="0", batched=False)]
        return Spec(name="quick", dit_config=dict(RELEASE_CHECK_DIT), compute_sizes=official, compute_runs=3,
                    stream_size=(992, 544, 51), stream_batch=2, stream_passes=3, stream_runs=3,
                    planner_size=(992, 544), planner_grid=grid, vae_config=None, vae_size=(544, 992), vae_runs=1,
                    llm_config=dict(RELEASE_LLM, num_layers=2), llm_runs=2, budget_s=BUDGET_S["quick"])
    return Spec(name="full", dit_config=dict(RELEASE_CHECK_DIT), compute_sizes=official, compute_runs=5,
                stream_size=(992, 544, 51), stream_batch=2, stream_passes=4, stream_runs=3,
                planner_size=(992, 544), planner_grid=planner_grid([51, 204]), vae_config=None,
                vae_size=(544, 992), vae_runs=3, llm_config=dict(RELEASE_LLM, num_layers=4), llm_runs=3,
                budget_s=BUDGET_S["full"], compile_variants=("bf16", "fp8 matmul"))


def tokens_of(size: tuple) -> int:
    width, height, frames = size
    return latent_tokens(width, height, frames)


# --------------------------------------------------------------------------- time estimate


def seconds_for(flops: float = 0.0, h2d_bytes: float = 0.0, pageable_bytes: float = 0.0, pin_bytes: float = 0.0,
                fixed: float = 0.0) -> float:
    """Seconds at the assumed rates: compute + copies (not overlapped: an upper estimate) + fixed costs."""
    return (flops / (ASSUMED_TFLOPS * 1e12) + h2d_bytes / ASSUMED_H2D + pageable_bytes / PAGEABLE_H2D
            + pin_bytes / PIN_RATE + fixed)


COMPUTE_VARIANTS = (("sdpa", "bf16"), ("flash_attn", "bf16"), ("sageattention", "bf16"),
                    ("sdpa", "fp8 matmul"), ("sdpa", "fp8 dequantize"))


def estimate(spec: Spec, sizes: dict, vae_flops: Optional[float] = None, variants: Optional[int] = None) -> dict:
    """Up-front time estimate per section (seconds, FLOPs, bytes), printed before anything runs.

    ``sizes``: ``block_bytes`` (bf16 block), ``fp8_block_bytes``, ``non_block_bytes``, ``llm_layer_bytes``,
    ``vae_bytes`` -- from the planner's formulas or the built models.  ``vae_flops``: one chunk's decode
    (counted by torch's FlopCounterMode on the meta device; a fixed guess when that failed).
    ``variants``: compute variants that will run (default: all of :data:`COMPUTE_VARIANTS`, also
    the optional backends).
    """
    variants = len(COMPUTE_VARIANTS) if variants is None else variants
    D, layers = spec.dim, spec.layers
    bb, fb, nb = sizes["block_bytes"], sizes["fp8_block_bytes"], sizes["non_block_bytes"]
    out = {}
    out["startup"] = dict(seconds=STARTUP_S, flops=0, h2d_bytes=0, note="interpreter, torch, CUDA context")
    model_bytes = layers * (bb + fb) + 2 * nb
    out["environment"] = dict(seconds=seconds_for(fixed=3.0), flops=0, h2d_bytes=0,
                              note="nvidia-smi, fp8 probe, backend resolution")
    flops = bytes_ = 0
    for size in spec.compute_sizes:
        per = block_flops(tokens_of(size), D)["total"]
        flops += (1 + spec.compute_runs) * variants * per
        bytes_ += bb + fb + nb
    compiled = len(spec.compile_variants)  # at the first size: one eager call, the compiling one, the timed runs
    flops += (2 + spec.compute_runs) * compiled * block_flops(tokens_of(spec.compute_sizes[0]), D)["total"]
    out["compute"] = dict(seconds=seconds_for(flops, bytes_ + model_bytes, fixed=4.0 * len(spec.compute_sizes)
                                              + COMPILE_ROW_S * compiled),
                          flops=flops, h2d_bytes=bytes_ + model_bytes,
                          note="building the models (random weights, on the device) and compiling "
                               f"{compiled} block{'s' if compiled != 1 else ''} are counted here")
    n = tokens_of(spec.stream_size)
    passes = (1 + spec.stream_passes) + spec.stream_runs * spec.stream_passes
    flops = passes * layers * block_flops(n, D, spec.stream_batch)["total"]
    bytes_ = layers * bb * (1 + spec.stream_runs * spec.stream_passes) + 3 * bb + (1 + spec.stream_runs) * nb
    out["streaming"] = dict(seconds=seconds_for(flops, bytes_, pin_bytes=layers * bb, fixed=3.0), flops=flops,
                            h2d_bytes=bytes_, note="copies counted as if not hidden")
    width, height = spec.planner_size
    flops = bytes_ = pins = 0
    for row in spec.planner_grid:
        n = latent_tokens(width, height, row["frames"])
        batch, calls = (2, 1) if row["batched"] else (1, 2)
        flops += calls * layers * block_flops(n, D, batch)["total"]
        block = fb if row["weight_format"] == "fp8_scaled" else bb
        resident = blocks_for(row["blocks"], layers)
        bytes_ += nb + resident * block + (layers - resident) * block * calls
    pins = layers * fb  # the fp8 model's blocks are pinned once (the bf16 ones were in section 2)
    out["planner"] = dict(seconds=seconds_for(flops, bytes_, pin_bytes=pins, fixed=1.0 * len(spec.planner_grid)),
                          flops=flops, h2d_bytes=bytes_, note=f"{len(spec.planner_grid)} rows")
    cfg = spec.llm_config
    from stepvideo_core.text.step_llm import swiglu_width  # torch-free function in a torch module: import late

    llm = llm_layer_flops(spec.llm_tokens, spec.llm_batch, cfg["hidden_size"], cfg["num_attention_heads"],
                          cfg["num_attention_groups"], swiglu_width(cfg["ffn_hidden_size"])) * cfg["num_layers"]
    vae = 2.75e14 if vae_flops is None else vae_flops  # FlopCounterMode count at 544x992, the fallback
    flops = (1 + spec.vae_runs) * vae + 2 * (1 + spec.llm_runs) * llm
    pageable = (1 + spec.llm_runs) * cfg["num_layers"] * sizes["llm_layer_bytes"]
    out["vae_text"] = dict(seconds=seconds_for(flops, sizes["vae_bytes"] + cfg["num_layers"] * sizes["llm_layer_bytes"],
                                               pageable, fixed=4.0),
                           flops=flops, h2d_bytes=sizes["vae_bytes"], pageable_bytes=pageable,
                           note="VAE decode + Step-LLM resident and streamed")
    total = sum(v["seconds"] for v in out.values())
    return {"sections": out, "total_s": total, "budget_s": spec.budget_s,
            "assumed_tflops": ASSUMED_TFLOPS, "assumed_h2d_gb_s": ASSUMED_H2D / 1e9,
            "within_budget": None if spec.budget_s is None else total <= spec.budget_s}


def format_estimate(est: dict) -> str:
    lines = [f"Time estimate at {est['assumed_tflops']:g} TFLOP/s bf16 and {est['assumed_h2d_gb_s']:g} GB/s "
             f"host->device (copies not overlapped: an upper estimate):"]
    for name, item in est["sections"].items():
        lines.append(f"  {name:<12} {item['seconds']:7.1f} s   {item['flops'] / 1e12:10.1f} TFLOP  "
                     f"{item.get('h2d_bytes', 0) / 1e9:7.1f} GB  {item.get('note', '')}")
    budget = est["budget_s"]
    tail = "" if budget is None else f" of a {budget:.0f} s budget ({est['total_s'] / budget:.0%})"
    lines.append(f"  {'total':<12} {est['total_s']:7.1f} s{tail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def row(section: str, name: str, status: str, result: str, check: str = "", **values) -> dict:
    """One line of the report; ``values`` are the numbers behind ``result`` (for the JSON)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    return {"section": section, "name": name, "status": status, "result": result, "check": check,
            "values": values}


def exit_code(report: dict) -> int:
    """1 when any row failed or any section raised, else 0."""
    for section in report.get("sections", {}).values():
        if section.get("status") in FAILING:
            return 1
        if any(r["status"] in FAILING for r in section.get("rows", [])):
            return 1
    return 0


def failures(report: dict) -> list:
    return [f"{r['section']}: {r['name']}: {r['result']}" for s in report.get("sections", {}).values()
            for r in s.get("rows", []) if r["status"] in FAILING]


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def render_summary(report: dict) -> str:
    """The verdict: ok / FAIL, the exit code and every failing row."""
    fails = failures(report)
    counts = {}
    for section in report.get("sections", {}).values():
        for r in section.get("rows", []):
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    tally = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
    seconds = report.get("meta", {}).get("seconds")
    took = "" if seconds is None else f" in {seconds:.0f} s"
    return (f"result: {'FAIL' if fails else 'ok'} (exit {exit_code(report)}){took}; rows: {tally}"
            + "".join(f"\n  - {f}" for f in fails))


def render_section_text(name: str, section: dict) -> str:
    rows = section.get("rows", [])
    head = f"== {SECTION_TITLES.get(name, name)} [{section.get('status', '?')}"
    if section.get("seconds") is not None:
        head += f", {section['seconds']:.1f} s"
        if section.get("estimate_s") is not None:
            head += f" (estimated {section['estimate_s']:.1f} s)"
    head += "]"
    if not rows:
        return head + "\n  (no rows)"
    width = min(48, max(len(r["name"]) for r in rows))
    lines = [head]
    for r in rows:
        check = f"  [{r['check']}]" if r["check"] else ""
        lines.append(f"  {r['status']:<5} {r['name']:<{width}}  {r['result']}{check}")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    meta = report.get("meta", {})
    lines = ["# StepVideo GPU check", ""]
    for key in ("command", "mode", "device", "started", "finished", "seconds", "exit_code"):
        if key in meta:
            lines.append(f"- **{key}**: `{meta[key]}`" if key == "command" else f"- **{key}**: {meta[key]}")
    fails = failures(report)
    lines += ["", f"**Result: {'FAIL' if fails else 'ok'}** (exit {exit_code(report)})"]
    lines += [f"- {_cell(f)}" for f in fails]
    est = report.get("estimate")
    if est:
        lines += ["", "## Time: estimate vs measured", "",
                  "| section | estimated s | measured s |", "|---|---:|---:|"]
        for name, item in est["sections"].items():
            measured = report.get("sections", {}).get(name, {}).get("seconds")
            if name == "startup":
                measured = meta.get("startup_s")
            lines.append(f"| {name} | {item['seconds']:.1f} | {'' if measured is None else f'{measured:.1f}'} |")
        lines.append(f"| total | {est['total_s']:.1f} | {meta.get('seconds', '')} |")
    for name in SECTIONS:
        section = report.get("sections", {}).get(name)
        if section is None:
            continue
        lines += ["", f"## {SECTION_TITLES.get(name, name)}", "",
                  f"status **{section.get('status')}**"
                  + (f", {section['seconds']:.1f} s" if section.get("seconds") is not None else ""), ""]
        if section.get("rows"):
            lines += ["| status | row | result | check |", "|---|---|---|---|"]
            lines += [f"| {r['status']} | {_cell(r['name'])} | {_cell(r['result'])} | {_cell(r['check'])} |"
                      for r in section["rows"]]
        if section.get("traceback"):
            lines += ["", "```text", section["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1, default=_json_default)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)

