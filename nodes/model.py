"""Model-family nodes: loading the Step-Video DiT into a STEPVIDEO_MODEL handle."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..stepvideo_core import load_transformer
from ..stepvideo_core.attention import BACKENDS, check_backend
from ..stepvideo_core.compile import MODES as COMPILE_MODES
from ..stepvideo_core.dtypes import DEFAULT, DTYPES, parse_dtype
from . import comfy_bridge as bridge
from .types import STEPVIDEO_MODEL, StepVideoModelHandle

log = logging.getLogger("StepVideo")

DIT_FOLDER = "diffusion_models"
WEIGHT_DTYPES = (DEFAULT, *DTYPES)  # the full-precision choices: "default" (see default_dtype) and every name
# weight_dtype combo: the full-precision dtypes above, plus scaled fp8 block weights and "auto"
# (fp8_scaled for pre-quantised files, else "default"). fp8 computes in the "default" dtype.
WEIGHT_CHOICES = ("auto", *WEIGHT_DTYPES, "fp8_scaled")
# blocks_on_device combo: the planner decides, every block, or a fixed number (capped at the model's).
BLOCK_CHOICES = ("auto", "all", *(str(i) for i in range(49)))
DEFAULT_ATTENTION = "sdpa"


def resolve_weight_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Return the torch dtype for a full-precision ``weight_dtype`` combo value.

    "default" follows the core's rule (:func:`~stepvideo_core.dtypes.default_dtype`: bf16 on
    CUDA, fp32 elsewhere).  Raises ValueError naming the allowed values for any other choice.
    """
    try:
        return parse_dtype(choice, device, choices=WEIGHT_DTYPES, what="weight_dtype")
    except ValueError as exc:
        raise ValueError(f"StepVideo: {exc}") from None


def resolve_weight_choice(choice: str, device: torch.device) -> tuple[torch.dtype, str]:
    """Return (compute dtype, core ``weight_format``) for a ``weight_dtype`` combo value.

    Full-precision choices load every weight in their dtype ("full"); "fp8_scaled" keeps the
    blocks' Linear weights in fp8 and computes in the "default" dtype; "auto" lets the core
    follow the file (fp8 for pre-quantised files).
    """
    if choice == "auto":
        return resolve_weight_dtype("default", device), "auto"
    if choice == "fp8_scaled":
        return resolve_weight_dtype("default", device), "fp8_scaled"
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"StepVideo: unknown weight_dtype {choice!r}; expected one of {list(WEIGHT_CHOICES)}")
    return resolve_weight_dtype(choice, device), "full"


def checkpoint_files(path: Path) -> list[Path]:
    """Return the files whose change means the checkpoint at `path` changed.

    A single file is itself; a model folder contributes its JSON and weight files; an
    official root contributes those of its ``transformer/`` subfolder.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if bridge.is_official_root(path, DIT_FOLDER):
        path = path / bridge.OFFICIAL_SUBFOLDER[DIT_FOLDER]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))


def format_count(n: int) -> str:
    """Return a parameter count as a short human string: 30.1B, 4.2M, 1.5K, 12."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def summarize(handle: StepVideoModelHandle, name: str, seconds: float) -> str:
    """Return the multi-line summary shown on the node and stored in the prompt's history."""
    cfg = handle.config
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    dtype = str(handle.dtype).replace("torch.", "")
    if handle.weight_format == "fp8_scaled":
        dtype = f"fp8_scaled blocks, compute {dtype}"
    stored = sum(t.numel() * t.element_size() for t in (*handle.transformer.parameters(),
                                                         *handle.transformer.buffers()))
    kind = ("Step-Video-TI2V (image-to-video: connect StepVideo Image to Video to the sampler)"
            if getattr(cfg, "is_ti2v", False) else "Step-Video-T2V (text-to-video)")
    return "\n".join([
        f"Step-Video DiT: {name}",
        kind,
        f"{cfg.num_layers} layers, width {heads * head_dim} ({heads} heads x {head_dim})",
        f"{format_count(handle.transformer.num_parameters())} parameters, {dtype} ({stored / 1e9:.2f} GB)",
        f"blocks on device: {handle.blocks_on_device}",
        f"weights on {handle.offload_device}, compute on {handle.device}",
        f"attention {handle.attention}, loaded in {seconds:.1f} s",
        *([f"compile: {handle.compile} (the first sampling step compiles)"] if handle.compile != "off" else []),
    ])


class StepVideoModelLoader:
    """Loads the Step-Video DiT, T2V or TI2V (official folder or single .safetensors file)."""

    CATEGORY = "StepVideo/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (STEPVIDEO_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Step-Video DiT with its dtype, device and attention choice.",)
    DESCRIPTION = (
        "Loads the Step-Video-T2V transformer from models/diffusion_models: an official "
        "stepvideo-t2v folder, its transformer/ subfolder, or one .safetensors file."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (bridge.list_model_entries(DIT_FOLDER), {
                    "tooltip": "An official stepvideo-t2v folder (or its transformer/ subfolder) "
                               "or a single .safetensors file under models/diffusion_models.",
                }),
                "weight_dtype": (list(WEIGHT_CHOICES), {
                    "default": "auto",
                    "tooltip": "auto = fp8_scaled for pre-quantised fp8 files, else default. "
                               "default = bf16 on CUDA, fp32 on CPU. fp8_scaled = block weights in fp8 "
                               "with per-channel scales (half the memory; quantised while loading a "
                               "bf16 checkpoint), computing in the default dtype.",
                }),
                "attention": (list(BACKENDS), {
                    "default": DEFAULT_ATTENTION,
                    "tooltip": "sdpa runs everywhere; auto picks the fastest installed kernel "
                               "(sageattention, flash_attn) that can run.",
                }),
                "blocks_on_device": (list(BLOCK_CHOICES), {
                    "default": "auto",
                    "tooltip": "Transformer blocks kept on the GPU while sampling; the others are "
                               "streamed from RAM. auto = the most that fit the free VRAM (planned "
                               "per run from size and frames); all = no streaming.",
                }),
            },
            "optional": {
                "compile": (list(COMPILE_MODES), {
                    "default": "off",
                    "tooltip": "blocks = torch.compile each transformer block (one compiled graph shared by all "
                               "48; works with block streaming, fp8 and LoRA). The first sampling step compiles "
                               "(tens of seconds to minutes, again for a new video size or LoRA strength); needs "
                               "Triton on a GPU (Windows: pip install triton-windows). If compiling fails the "
                               "sampler runs eagerly with one warning. off = eager.",
                }),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, weight_dtype, attention, blocks_on_device="auto", compile="off"):
        """Return a fingerprint of the checkpoint's files (names, sizes, mtimes).

        Re-saving the weights under the same name makes ComfyUI reload them. A missing
        entry returns NaN, which never equals itself, so the node runs and reports it.
        """
        try:
            files = checkpoint_files(bridge.resolve_model_path(DIT_FOLDER, model))
            return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        except OSError:
            return float("nan")

    def load(self, model, weight_dtype, attention, blocks_on_device="auto", compile="off"):
        """Return the UI summary and a :class:`StepVideoModelHandle` for entry `model`."""
        path = bridge.resolve_model_path(DIT_FOLDER, model)
        device, offload = bridge.torch_device(), bridge.offload_device()
        dtype, weight_format = resolve_weight_choice(weight_dtype, device)
        check_backend(attention, device, dtype)
        if str(blocks_on_device) not in BLOCK_CHOICES:
            raise ValueError(f"StepVideo: blocks_on_device must be 'auto', 'all' or 0-48, got {blocks_on_device!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"StepVideo: compile must be one of {list(COMPILE_MODES)}, got {compile!r}")

        start = time.perf_counter()
        transformer = load_transformer(path, dtype=dtype, device=offload, attention=attention,
                                       weight_format=weight_format)
        seconds = time.perf_counter() - start

        handle = StepVideoModelHandle(
            transformer=transformer, dtype=dtype, device=device, offload_device=offload,
            attention=attention, source=path, weight_format=transformer.weight_format,
            blocks_on_device=str(blocks_on_device), compile=compile,
        )
        summary = summarize(handle, model, seconds)
        log.info(summary.replace("\n", "; "))
        return {"ui": {"text": [summary]}, "result": (handle,)}


NODE_CLASS_MAPPINGS = {"StepVideoModelLoader": StepVideoModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"StepVideoModelLoader": "StepVideo Model Loader"}
