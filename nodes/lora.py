"""LoRA-family node: StepVideoLoraLoader (STEPVIDEO_MODEL or a native MODEL + adapter file -> the same kind).

The node never touches weights.  It reads the adapter, validates every key and shape
against the model's transformer (so an adapter that matches nothing fails here, not in
the sampler), and:

* for a ``STEPVIDEO_MODEL`` handle, returns a new handle whose ``adapters`` tuple has one more
  :class:`~stepvideo_core.lora.LoraEntry`; the base weights stay shared.  The sampler applies the
  whole stack for the duration of a run (``stepvideo_core.lora.attached``);
* for ComfyUI's ``MODEL`` of a Step-Video DiT, returns a clone of the ModelPatcher with the
  adapter as ComfyUI weight patches (:func:`.native_lora.apply_to_model`), which ComfyUI's own
  machinery merges on load, computes per layer when partially loaded, and removes.

Importing this module also installs the pack's LoRA-name hook into ComfyUI when ComfyUI is
running (:mod:`.native_lora`), so core's LoRA loaders read the same names on a native MODEL.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path

from ..stepvideo_core.checks import finite_float
from ..stepvideo_core.lora import MODES, LoraEntry, format_blocks, load_lora, parse_blocks
from ..stepvideo_core.lora.formats import CONFIG_NAME
from . import comfy_bridge as bridge
from . import native_lora
from .types import STEPVIDEO_MODEL

# The socket takes and gives either kind (ComfyUI validates "A,B" against A or B); the value is of the input's kind.
MODEL_TYPES = f"{STEPVIDEO_MODEL},MODEL"

log = logging.getLogger("StepVideo")

LORA_FOLDER = "loras"
_CACHE_SIZE = 4
_cache: dict = {}  # (path, size, mtime, id(transformer)) -> (weakref to transformer, LoraAdapter)


def _fingerprint(path: Path) -> tuple:
    """(path, size, mtime) of the adapter file and of a PEFT ``adapter_config.json`` beside it."""
    files = [path] + ([path.parent / CONFIG_NAME] if (path.parent / CONFIG_NAME).is_file() else [])
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def read_validated(path: Path, transformer, name: str):
    """The adapter at ``path`` validated against ``transformer``, from a small cache when unchanged.

    Exists so that moving the strength slider does not re-read a large file; the cache
    is keyed by the file's fingerprint and the transformer object itself.
    """
    key = (_fingerprint(path), id(transformer))
    hit = _cache.get(key)
    if hit is not None and hit[0]() is transformer:
        return hit[1]
    adapter = load_lora(path, transformer, name=name)
    if len(_cache) >= _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    _cache[key] = (weakref.ref(transformer), adapter)
    return adapter


def auto_note(handle) -> str:
    """What "auto" will do for this model, in words (the sampler decides per run)."""
    if getattr(handle, "weight_format", "full") == "fp8_scaled":
        return "on the fly for the fp8 block layers, merged elsewhere"
    return "merged into blocks kept on the GPU, on the fly for streamed blocks (decided per run)"


class StepVideoLoraLoader:
    """Adds a LoRA (or .diff adapter) to a Step-Video model (handle or native MODEL); chain several to stack them."""

    CATEGORY = "StepVideo/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPES,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with this adapter added (base weights shared): a STEPVIDEO_MODEL for a "
                       "STEPVIDEO_MODEL input, a MODEL for a MODEL input.",)
    DESCRIPTION = (
        "Loads a LoRA for Step-Video from models/loras (PEFT/diffusers, kohya/musubi, ComfyUI-style or "
        ".diff files; split q/k/v adapters are mapped into the fused layers) and checks every key "
        "against the model. The node's text says what matched and what did not. Takes the StepVideo "
        "model or ComfyUI's MODEL of a Step-Video DiT and returns the same kind."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPES, {"tooltip": "From StepVideo Model Loader (or another LoRA loader), or a "
                                                   "ComfyUI MODEL of a Step-Video DiT."}),
                "lora_name": (bridge.list_model_entries(LORA_FOLDER), {
                    "tooltip": "A .safetensors adapter under models/loras (a PEFT folder: pick its "
                               "adapter_model.safetensors; adapter_config.json beside it supplies alpha).",
                }),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Multiplies the adapter's update; negative values invert it."}),
                "mode": (list(MODES), {
                    "default": "auto",
                    "tooltip": "merge = add the update to the weights for the run (fp8 weights are "
                               "re-quantised; an exact copy of each touched weight is kept in RAM and put back "
                               "afterwards); on_the_fly = compute the low-rank update inside each layer "
                               "(no weight changes, no copies, ~1% more compute); auto = on the fly for fp8 "
                               "layers and streamed blocks, merge otherwise. For a ComfyUI MODEL, ComfyUI "
                               "decides (merged when it loads the model, per layer when partially loaded).",
                }),
                "blocks": ("STRING", {"default": "",
                                      "tooltip": "Transformer blocks to apply to, e.g. 0-11,40 (0-47). "
                                                 "Empty = every layer of the adapter; with a filter, layers "
                                                 "outside the blocks are left alone."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, model, lora_name, strength, mode, blocks):
        """Fingerprint of the adapter file, so re-saving it under the same name reloads it (NaN when missing)."""
        try:
            return repr(_fingerprint(bridge.resolve_model_path(LORA_FOLDER, lora_name)))
        except OSError:
            return float("nan")

    def load(self, model, lora_name, strength, mode, blocks=""):
        """Return the UI report and a new handle with this adapter appended to ``model.adapters``.

        Raises ValueError for a NaN/Inf strength (a JSON NaN passes ComfyUI's min/max check) and
        LoraError for an adapter that does not fit the model or holds NaN/Inf values.
        """
        if mode not in MODES:
            raise ValueError(f"StepVideo: unknown LoRA mode {mode!r}; expected one of {list(MODES)}")
        strength = finite_float(strength, "strength")
        path = bridge.resolve_model_path(LORA_FOLDER, lora_name)
        if native_lora.is_native_model(model):
            return self._load_native(model, path, lora_name, strength, mode, blocks)
        transformer = model.transformer
        selected = parse_blocks(blocks, transformer.config.num_layers)
        adapter = read_validated(path, transformer, lora_name)
        entry = LoraEntry(adapter, strength, mode, selected)
        if selected is not None and not entry.selected() and strength != 0:
            raise ValueError(f"StepVideo: the block filter {blocks!r} leaves nothing of LoRA {lora_name}: it changes "
                             f"blocks {format_blocks(adapter.blocks()) or 'none'} only")
        handle = dataclasses.replace(model, adapters=tuple(model.adapters) + (entry,))
        lines = [adapter.report(),
                 f"strength {strength:g}, mode {mode}" + (f" ({auto_note(model)})" if mode == "auto" else "")
                 + ("" if selected is None else f", blocks {format_blocks(selected)}: "
                                                f"{len(entry.selected())} of {len(adapter.patches)} patches"),
                 f"model carries {len(handle.adapters)} LoRA(s): "
                 + "; ".join(e.describe() for e in handle.adapters)]
        if strength == 0:
            lines.append("strength 0: this adapter has no effect")
        report = "\n".join(lines)
        log.info("StepVideo LoRA: %s", report.replace("\n", "; "))
        if adapter.unmatched:
            log.warning("StepVideo LoRA %s: %d tensors not matched (e.g. %s)", lora_name, len(adapter.unmatched),
                        ", ".join(k for k, _ in adapter.unmatched[:3]))
        return {"ui": {"text": [report]}, "result": (handle,)}

    def _load_native(self, model, path: Path, lora_name: str, strength: float, mode: str, blocks: str):
        """The MODEL path: the same reading and checks, then ComfyUI patches on a clone of the patcher."""
        transformer = native_lora.stepvideo_dit(getattr(model, "model", None))
        if transformer is None:
            raise ValueError(native_lora.stepvideo_model_error(model))
        selected = parse_blocks(blocks, transformer.config.num_layers)
        adapter = read_validated(path, transformer, lora_name)
        entry = LoraEntry(adapter, strength, mode, selected)
        if selected is not None and not entry.selected() and strength != 0:
            raise ValueError(f"StepVideo: the block filter {blocks!r} leaves nothing of LoRA {lora_name}: it changes "
                             f"blocks {format_blocks(adapter.blocks()) or 'none'} only")
        result = native_lora.apply_to_model(model, entry)
        lines = [adapter.report(),
                 f"strength {strength:g}, as {result.summary()}"
                 + ("" if selected is None else f", blocks {format_blocks(selected)}: "
                                                f"{len(entry.selected())} of {len(adapter.patches)} patches")]
        if mode != "auto":
            lines.append(f"mode {mode} does not apply to a ComfyUI MODEL: ComfyUI merges the patches when it loads "
                         f"the model and computes them per layer when it loads the model partially")
        if result.skipped:
            shown = "; ".join(f"{', '.join(keys)} ({why})" for keys, why in result.skipped[:5])
            more = f" and {len(result.skipped) - 5} more" if len(result.skipped) > 5 else ""
            lines.append(f"NOT applied: {shown}{more}")
        if strength == 0:
            lines.append("strength 0: this adapter has no effect")
        report = "\n".join(lines)
        log.info("StepVideo LoRA (MODEL): %s", report.replace("\n", "; "))
        if adapter.unmatched or result.skipped:
            log.warning("StepVideo LoRA %s: %d tensors not matched, %d patches not applied (e.g. %s)", lora_name,
                        len(adapter.unmatched), len(result.skipped),
                        ", ".join([k for k, _ in adapter.unmatched[:3]] + [keys[0] for keys, _ in result.skipped[:1]]))
        return {"ui": {"text": [report]}, "result": (result.model,)}


NODE_CLASS_MAPPINGS = {"StepVideoLoraLoader": StepVideoLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"StepVideoLoraLoader": "StepVideo LoRA Loader"}
