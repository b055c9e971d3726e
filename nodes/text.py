"""Text-family nodes: load Step-LLM + HunyuanCLIP, encode prompts into STEPVIDEO_CONDITIONING.

Folders come from ComfyUI's ``text_encoders`` model folder (via the bridge).  An entry is
a release root holding ``step_llm/`` and/or ``hunyuan_clip/`` (e.g. ``stepvideo-t2v``),
or one of those component folders itself.  Prompts follow the official conventions:
the positive prompt gets the "magic" quality suffix (switchable), the negative prompt
node starts with the official negative prompt (editable).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ..stepvideo_core import load_text_encoder
from ..stepvideo_core.text.encoder import (NEGATIVE_PROMPT, StepVideoTextEncoder, resolve_text_encoder_dirs,
                                           text_encoder_files, with_magic)
from ..stepvideo_core.text.streaming import PLANS, stream_bytes
from ..stepvideo_core.text.tokenizer import MAX_LENGTH
from . import comfy_bridge as bridge
from .types import STEPVIDEO_CONDITIONING, STEPVIDEO_TEXT_ENCODER, StepVideoConditioning

log = logging.getLogger("StepVideo")

TEXT_FOLDER = "text_encoders"
LLM_DTYPES = {"default": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_DEPTH = 4  # how deep below a text_encoders folder entries are looked for


def is_step_llm_folder(path: Path) -> bool:
    """Return True if `path` looks like the release's ``step_llm/`` (config.json + shard index or tokenizer)."""
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors.index.json")) or (path / "step1_chat_tokenizer.model").is_file())


def is_clip_folder(path: Path) -> bool:
    """Return True if `path` looks like the release's ``hunyuan_clip/`` (clip_text_encoder/ + tokenizer/)."""
    return (path / "clip_text_encoder").is_dir() and (path / "tokenizer").is_dir()


def _matches(path: Path, component: str) -> bool:
    """True if `path` is the `component` folder or a root holding it under its release name."""
    test = is_step_llm_folder if component == "step_llm" else is_clip_folder
    return test(path) or test(path / component)


def list_text_encoder_entries(component: str) -> list[str]:
    """Return the ``text_encoders`` entries offering `component` ("step_llm" or "hunyuan_clip").

    Each entry is a relative folder name: a release root (listed once, not descended into)
    or the component folder itself.
    """
    if component not in ("step_llm", "hunyuan_clip"):
        raise ValueError(f"unknown text encoder component {component!r}")
    names = set()
    for base in bridge.model_dirs(TEXT_FOLDER):
        for dirpath, dirnames, _files in os.walk(base, followlinks=True):
            here = Path(dirpath)
            depth = len(here.relative_to(base).parts)
            if here != base and _matches(here, component):
                names.add(here.relative_to(base).as_posix())
                dirnames[:] = []
                continue
            dirnames[:] = [] if depth >= MAX_DEPTH else sorted(d for d in dirnames if not d.startswith("."))
    return sorted(names, key=str.lower)


def _entries_or_hint(component: str) -> list[str]:
    """Combo options; an empty folder gets a single hint entry so the node still renders."""
    return list_text_encoder_entries(component) or [f"(no {component} folder in models/{TEXT_FOLDER})"]


def summarize_encode(cond: StepVideoConditioning, plan: str, seconds: float, cached: bool) -> str:
    """Return the text shown on an encode node: tokens used, how it ran, and any warnings."""
    llm_tokens = int(cond.encoder_attention_mask.sum()) - cond.encoder_hidden_states_2.shape[1]
    how = "from cache" if cached else f"plan {plan}, {seconds:.1f} s"
    lines = [f"Step-LLM tokens: {llm_tokens} of {MAX_LENGTH} (with BOS/EOS); {how}"]
    lines += [f"WARNING: {note}" for note in cond.notes]
    return "\n".join(lines)


def encode_prompt(encoder: StepVideoTextEncoder, prompt: str) -> dict:
    """Encode one prompt with a progress bar and interrupt checks; return the node output dict."""
    if not isinstance(encoder, StepVideoTextEncoder):
        raise TypeError("StepVideo: text_encoder must come from StepVideoTextEncoderLoader")
    notes = tuple(encoder.notes([prompt]))
    cached = encoder.is_cached(prompt)
    if not cached and encoder.device.type != "cpu" and encoder.plan != "cpu":
        bridge.free_memory(stream_bytes(encoder.llm, 1, MAX_LENGTH), encoder.device)
    bar = bridge.progress_bar(len(encoder.llm.layers) + 1)

    def on_step(done: int, total: int) -> None:
        bridge.check_interrupt()
        bar.update_absolute(done, total)

    start = time.perf_counter()
    out = encoder.encode([prompt], callback=on_step)
    cond = StepVideoConditioning(prompt=prompt, notes=notes, **out)
    text = summarize_encode(cond, encoder.last_plan or "-", time.perf_counter() - start, cached)
    for note in notes:
        log.warning("StepVideo: %s", note)
    return {"ui": {"text": [text]}, "result": (cond,)}


class StepVideoTextEncoderLoader:
    """Loads Step-LLM (step_llm/) and HunyuanCLIP (hunyuan_clip/) into one STEPVIDEO_TEXT_ENCODER."""

    CATEGORY = "StepVideo/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (STEPVIDEO_TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("Step-LLM + HunyuanCLIP, ready for StepVideo Text Encode.",)
    DESCRIPTION = (
        "Loads the two Step-Video text encoders from models/text_encoders: a stepvideo-t2v folder "
        "(holding step_llm/ and hunyuan_clip/) or the two folders themselves. The 19.6B Step-LLM "
        "rests in CPU memory and runs on the GPU layer by layer when it does not fit."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "step_llm": (_entries_or_hint("step_llm"), {
                    "tooltip": "A stepvideo-t2v folder or its step_llm/ folder (config.json, model-*.safetensors "
                               "shards, model.safetensors.index.json, step1_chat_tokenizer.model).",
                }),
                "hunyuan_clip": (_entries_or_hint("hunyuan_clip"), {
                    "tooltip": "A stepvideo-t2v folder or its hunyuan_clip/ folder (clip_text_encoder/, tokenizer/).",
                }),
                "weight_dtype": (list(LLM_DTYPES), {
                    "default": "default",
                    "tooltip": "Step-LLM weights: default = bf16 (39 GB, as released); fp32 needs 78 GB of RAM. "
                               "HunyuanCLIP always runs in fp32 like the official code.",
                }),
                "alibi": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Step-LLM attention bias. On: causal attention with the sqrt-ALiBi bias, our best "
                               "reconstruction of StepFun's closed CUDA op. Off: plain causal attention, for "
                               "comparison only.",
                }),
                "device_plan": (list(PLANS), {
                    "default": "auto",
                    "tooltip": "auto: resident if the whole Step-LLM fits in free VRAM, else streamed layer by "
                               "layer from RAM, else CPU. resident / stream / cpu force one.",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, step_llm, hunyuan_clip, weight_dtype, alibi, device_plan):
        """Return a fingerprint of every file read (names, sizes, mtimes); NaN when unresolvable."""
        try:
            llm_dir, clip_dir = resolve_text_encoder_dirs(bridge.resolve_model_path(TEXT_FOLDER, step_llm),
                                                          bridge.resolve_model_path(TEXT_FOLDER, hunyuan_clip))
            files = text_encoder_files(llm_dir, clip_dir)
            return ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        except (OSError, ValueError):
            return float("nan")

    def load(self, step_llm, hunyuan_clip, weight_dtype, alibi, device_plan):
        """Return the UI summary and the loaded :class:`StepVideoTextEncoder`."""
        if weight_dtype not in LLM_DTYPES:
            raise ValueError(f"StepVideo: unknown weight_dtype {weight_dtype!r}; expected one of {list(LLM_DTYPES)}")
        llm_path = bridge.resolve_model_path(TEXT_FOLDER, step_llm)
        clip_path = bridge.resolve_model_path(TEXT_FOLDER, hunyuan_clip)
        start = time.perf_counter()
        encoder = load_text_encoder(llm_path, clip_path, dtype=LLM_DTYPES[weight_dtype], device=bridge.torch_device(),
                                    plan=device_plan, alibi=bool(alibi), weights_device=bridge.offload_device(),
                                    free_vram=bridge.free_vram)
        summary = encoder.describe() + f"\nloaded in {time.perf_counter() - start:.1f} s"
        log.info(summary.replace("\n", "; "))
        return {"ui": {"text": [summary]}, "result": (encoder,)}


class StepVideoTextEncode:
    """Encodes a positive prompt (Chinese, English or mixed) for the Step-Video DiT."""

    CATEGORY = "StepVideo/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = (STEPVIDEO_CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Step-LLM and HunyuanCLIP embeddings with the cross-attention mask.",)
    DESCRIPTION = (
        "Encodes a prompt with Step-LLM and HunyuanCLIP. add_magic appends the official quality suffix "
        "(as StepFun's pipeline does for every positive prompt). Results are cached per prompt. For the "
        "negative side use StepVideo Negative Text Encode, pre-filled with the official negative prompt."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (STEPVIDEO_TEXT_ENCODER,),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                      "tooltip": "What the video shows; Chinese, English or both."}),
                "add_magic": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Append the official positive suffix: " + with_magic("", True),
                }),
            }
        }

    def encode(self, text_encoder, prompt, add_magic):
        """Return the UI note and the STEPVIDEO_CONDITIONING of ``prompt`` (+ the magic suffix if asked)."""
        return encode_prompt(text_encoder, with_magic(prompt, bool(add_magic)))


class StepVideoNegativeTextEncode:
    """Encodes the negative prompt; starts with the official default, which can be edited."""

    CATEGORY = "StepVideo/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = (STEPVIDEO_CONDITIONING,)
    RETURN_NAMES = ("negative",)
    OUTPUT_TOOLTIPS = ("The negative (unconditional) side of classifier-free guidance.",)
    DESCRIPTION = (
        "Encodes the negative prompt for classifier-free guidance. The text starts as StepFun's official "
        "negative prompt and is used as written (no suffix is added, as in the official pipeline)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (STEPVIDEO_TEXT_ENCODER,),
                "prompt": ("STRING", {"multiline": True, "default": NEGATIVE_PROMPT,
                                      "tooltip": "What the video should avoid; the official default is pre-filled."}),
            }
        }

    def encode(self, text_encoder, prompt):
        """Return the UI note and the STEPVIDEO_CONDITIONING of the negative ``prompt`` as written."""
        return encode_prompt(text_encoder, prompt)


NODE_CLASS_MAPPINGS = {
    "StepVideoTextEncoderLoader": StepVideoTextEncoderLoader,
    "StepVideoTextEncode": StepVideoTextEncode,
    "StepVideoNegativeTextEncode": StepVideoNegativeTextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StepVideoTextEncoderLoader": "StepVideo Text Encoder Loader",
    "StepVideoTextEncode": "StepVideo Text Encode",
    "StepVideoNegativeTextEncode": "StepVideo Negative Text Encode",
}
