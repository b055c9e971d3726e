"""Server routes of the pack: ``GET /stepvideo/plan``, the memory plan the web extension shows.

The web extension (``web/stepvideo.js``) asks this route whenever a sampler's size or a
loader's dtype/blocks change, and draws the answer on the nodes. The numbers come from
the same pure planner the sampler runs (:func:`stepvideo_core.offload.auto_plan`), fed
with what only the server knows: the compute device and its free memory, and the chosen
checkpoint's real configuration and storage format (read from file headers, cached).

Query parameters (all optional; the defaults are the official settings):

``width``, ``height``, ``frames``
    video size (multiples of 16, 16 and 17; others get HTTP 400 naming the nearest valid values)
``preset``, ``steps``, ``cfg``
    as on StepVideoSampler (0 = the preset's); ``cfg`` > 1 means two model calls per step
``model``, ``weight_dtype``, ``attention``, ``blocks_on_device``
    as on StepVideoModelLoader; ``model`` is an entry of models/diffusion_models
``free_gb``
    plan for this much free VRAM instead of the device's (e.g. a CPU-only server, or
    "what would a 24 GB card do")

The answer is JSON: ``device`` (type, name, free/total/freeable bytes), ``model`` (layers,
width, stored format, or why it could not be read), ``weight_format``/``compute_dtype``
used, ``plan`` (the planner's dict: blocks on device, peak, reserve, fits, message),
``fits`` (True/False; None on the CPU, where nothing is planned), ``weights_bytes`` (host
RAM the weights take), ``flops_per_step`` and ``time`` (a rough estimate, see
:func:`time_estimate`, or None).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Optional

import torch

from ..stepvideo_core.checkpoint import CheckpointError
from ..stepvideo_core.flops import step_flops
from ..stepvideo_core.dit.loader import detect_weight_format, find_transformer_files, resolve_config
from ..stepvideo_core.dtypes import DTYPE_NAMES
from ..stepvideo_core.offload.planner import (ATTENTION_BACKENDS, DEFAULT_CONFIG, GiB, PlanInputs, auto_plan,
                                              human_bytes, planned_format, weight_bytes)
from ..stepvideo_core.sampling import DEFAULT_PRESET, PRESETS, SizeError, check_video_size, resolve_settings
from . import comfy_bridge as bridge
from .model import BLOCK_CHOICES, DIT_FOLDER, WEIGHT_CHOICES, checkpoint_files, resolve_weight_choice

log = logging.getLogger("StepVideo")

PLAN_ROUTE = "/stepvideo/plan"
DEFAULTS = {"width": 992, "height": 544, "frames": 204}
MAX_SIDE, MAX_FRAMES = 4096, 1020  # the sampler's widget limits

# Datasheet peak dense BF16 tensor throughput (TFLOPS, FP32 accumulate, no sparsity), matched in
# order against the lower-cased device name. Only used for the rough time estimate.
GPU_BF16_TFLOPS = (
    ("h200", 989.0), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0), ("a100", 312.0),
    ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("rtx 6000 ada", 364.0), ("rtx a6000", 155.0),
    ("rtx 4090", 165.0), ("rtx 3090", 71.0),
)
UTILISATION = 0.5                 # assumed fraction of the datasheet rate reached (not measured)
HOST_TO_DEVICE_BYTES_PER_S = 20e9  # assumed effective PCIe 4.0 x16 copy rate for streamed blocks


class PlanRequestError(ValueError):
    """A query the plan cannot be made for; the message is sent back with HTTP 400."""


# --------------------------------------------------------------------------- query


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise PlanRequestError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise PlanRequestError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(query: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise PlanRequestError(f"{name} must be a number, got {raw!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise PlanRequestError(f"{name} must be between {low:g} and {high:g}, got {raw}")
    return value


def _choice(query: Mapping[str, str], name: str, default: str, choices) -> str:
    value = query.get(name) or default
    if value not in choices:
        raise PlanRequestError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def parse_query(query: Mapping[str, str]) -> dict:
    """Return the validated request (see the module docstring); raises :class:`PlanRequestError`."""
    req = {name: _int(query, name, default, 1, MAX_FRAMES if name == "frames" else MAX_SIDE)
           for name, default in DEFAULTS.items()}
    try:
        check_video_size(req["width"], req["height"], req["frames"])
    except SizeError as exc:
        raise PlanRequestError(str(exc)) from None
    req["preset"] = _choice(query, "preset", DEFAULT_PRESET, PRESETS)
    steps = _int(query, "steps", 0, 0, 1000)
    cfg = _float(query, "cfg", 0.0, 0.0, 30.0)
    run = resolve_settings(req["preset"], steps or None, cfg or None, None)
    req.update(steps=run["steps"], cfg=run["cfg"], guided=run["cfg"] > 1.0)
    req["weight_dtype"] = _choice(query, "weight_dtype", "auto", WEIGHT_CHOICES)
    req["attention"] = _choice(query, "attention", "sdpa", ATTENTION_BACKENDS)
    req["blocks_on_device"] = _choice(query, "blocks_on_device", "auto", BLOCK_CHOICES)
    req["model"] = query.get("model") or None
    free_gb = _float(query, "free_gb", 0.0, 0.0, 1 << 20)
    req["free_gb"] = free_gb or None
    return req


# --------------------------------------------------------------------------- model


_MODEL_CACHE: dict = {}


def model_info(name: Optional[str]) -> dict:
    """What the plan needs from checkpoint entry ``name``: its config and storage format.

    Reads safetensors headers and config.json only (no weights), cached per file
    fingerprint. A missing or unreadable entry gives ``found: False`` with the reason,
    and the plan then assumes the released 30B model.
    """
    released = {"name": name, "found": False, "config": None, "stored_format": None, "error": None}
    if not name:
        return released
    try:
        path = bridge.resolve_model_path(DIT_FOLDER, name)
        key = (str(path), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint_files(path)))
        if key not in _MODEL_CACHE:
            index, config_path = find_transformer_files(path)
            config = resolve_config(index, config_path)
            _MODEL_CACHE.clear()  # keep one entry per process: the combo rarely changes
            _MODEL_CACHE[key] = {"config": config.to_dict(), "stored_format": detect_weight_format(index)}
        return dict(released, found=True, **_MODEL_CACHE[key])
    except (OSError, CheckpointError) as exc:
        return dict(released, error=str(exc))


# --------------------------------------------------------------------------- time


def gpu_tflops(device_name: Optional[str]) -> Optional[float]:
    """Datasheet dense BF16 TFLOPS of a known GPU (see :data:`GPU_BF16_TFLOPS`), else None."""
    name = (device_name or "").lower()
    for key, tflops in GPU_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def time_estimate(flops: int, steps: int, plan: dict, block_bytes: int, device_name: Optional[str],
                  compute_dtype: str, guided: bool) -> Optional[dict]:
    """A rough sampling-time estimate, or None when it cannot be made honestly.

    Compute time per step = FLOPs / (:data:`UTILISATION` x the datasheet BF16 rate);
    streamed blocks are copied at :data:`HOST_TO_DEVICE_BYTES_PER_S` (once per step with
    batched CFG, twice with one branch at a time), overlapping compute, so a step takes
    the longer of the two. None for GPUs not in the table and for fp32 compute. Nothing
    here is measured: it says what order of magnitude to expect.
    """
    tflops = gpu_tflops(device_name)
    if tflops is None or compute_dtype == "fp32":
        return None
    compute = flops / (tflops * 1e12 * UTILISATION)
    calls = 1 if plan.get("batch_cfg", True) or not guided else 2
    transfer = plan["copies_per_step"] * calls * block_bytes / HOST_TO_DEVICE_BYTES_PER_S
    per_step = max(compute, transfer)
    return {"seconds_per_step": per_step, "seconds": per_step * steps, "compute_seconds_per_step": compute,
            "transfer_seconds_per_step": transfer, "tflops": tflops, "utilisation": UTILISATION,
            "basis": f"FLOPs / ({UTILISATION:.0%} of {tflops:g} TFLOPS datasheet BF16); "
                     f"streamed blocks at {HOST_TO_DEVICE_BYTES_PER_S / 1e9:g} GB/s; not measured"}


# --------------------------------------------------------------------------- plan


def build_plan(req: dict, device: dict, model: dict) -> dict:
    """The route's answer for a parsed request, a device (:func:`comfy_bridge.device_memory`)
    and a model (:func:`model_info`). Pure: all inputs are plain data."""
    assumed = req.get("free_gb") is not None
    on_gpu = device["type"] != "cpu" or assumed
    config = model.get("config")
    dims = dict(DEFAULT_CONFIG, **(config or {}))
    layers = dims["num_layers"]
    dtype, fmt = resolve_weight_choice(req["weight_dtype"], torch.device("cuda" if on_gpu else "cpu"))
    compute_dtype = DTYPE_NAMES[dtype]
    if fmt == "auto":
        fmt = "fp8_scaled" if model.get("stored_format") == "fp8_scaled" else "full"
    weight_format = planned_format(fmt, compute_dtype)
    notes = []
    if model.get("error"):
        notes.append("model not read: planned for the 30B release")  # the reason is in model.error
    elif not model.get("found"):
        notes.append("no model chosen: planned for the 30B release")
    if req["weight_dtype"] == "auto" and model.get("stored_format") is None:
        notes.append("auto dtype, format unknown: planned as bf16" if on_gpu else
                     "auto dtype, format unknown: planned as fp32")

    run = PlanInputs(req["width"], req["height"], req["frames"], cfg_batch=2 if req["guided"] else 1,
                     weight_format=weight_format, attention=req["attention"], compute_dtype=compute_dtype,
                     config=config)
    free = None
    if on_gpu:
        if assumed:
            free = int(req["free_gb"] * GiB)
        elif device.get("free_bytes") is not None:
            free = int(device["free_bytes"]) + int(device.get("freeable_bytes") or 0)
    if free is not None:
        choice = req["blocks_on_device"]
        blocks = layers if choice == "all" else ("auto" if choice == "auto" else int(choice))
        plan = auto_plan(dataclasses.replace(run, blocks_on_device=blocks), free_bytes=free)
        fits = bool(plan["fits"])
    else:  # the CPU (or a device whose memory is unknown): every block stays where it is
        plan = auto_plan(dataclasses.replace(run, blocks_on_device=layers), free_bytes=1 << 62)
        plan["free_bytes"], plan["fits"] = None, None
        plan["message"] = (f"{device['type']}: all {layers} blocks in place, "
                           f"peak {human_bytes(plan['peak_bytes'])} (no VRAM to plan)")
        fits = None
    sizes = weight_bytes(weight_format, compute_dtype, config)
    flops = step_flops(req["width"], req["height"], req["frames"], req["guided"], config)
    timing = None
    if free is not None and not (assumed and device["type"] == "cpu"):
        timing = time_estimate(flops, req["steps"], plan, sizes["block"], device.get("name"), compute_dtype,
                               req["guided"])
    return {
        "request": dict(req),
        "device": dict(device, assumed_free_bytes=free if assumed else None),
        "model": {"name": model.get("name"), "found": bool(model.get("found")), "layers": layers,
                  "width": dims["num_attention_heads"] * dims["attention_head_dim"],
                  "stored_format": model.get("stored_format"), "error": model.get("error")},
        "weight_format": weight_format, "compute_dtype": compute_dtype,
        "plan": plan, "fits": fits,
        "weights_bytes": sizes["block"] * sizes["layers"] + sizes["non_block"],
        "flops_per_step": flops, "steps": req["steps"], "time": timing, "notes": notes,
    }


def plan_handler(query: Mapping[str, str]) -> tuple[int, dict]:
    """``GET /stepvideo/plan``: (HTTP status, JSON body). 400 with ``error`` for a bad query."""
    try:
        req = parse_query(query)
    except (PlanRequestError, ValueError) as exc:
        return 400, {"error": str(exc)}
    return 200, build_plan(req, bridge.device_memory(), model_info(req["model"]))


def register() -> bool:
    """Register the pack's routes on ComfyUI's server (a no-op outside ComfyUI)."""
    return bridge.add_route("GET", PLAN_ROUTE, plan_handler)
