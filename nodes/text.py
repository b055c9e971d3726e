"""Text-family nodes: load Step-LLM + HunyuanCLIP, encode prompts into STEPVIDEO_CONDITIONING.

Folders come from ComfyUI's ``text_encoders`` model folder (via the bridge).  An entry is
a release root holding ``step_llm/`` and/or ``hunyuan_clip/`` (e.g. ``stepvideo-t2v``),
or one of those component folders itself.  Prompts follow the official conventions:
the positive prompt gets the "magic" quality suffix (switchable), the negative prompt
node starts with the official negative prompt (editable).

Memory.  Inside ComfyUI the two encoders are one ComfyUI-managed model (a ``ModelPatcher``
on the handle, see :func:`place_weights`): an encode asks ComfyUI to load them with
``load_models_gpu`` (ComfyUI frees VRAM for them, and may leave part of the Step-LLM in
RAM when VRAM is short: those layers are streamed, the others compute where ComfyUI put
them), and they stay loaded until ComfyUI needs the memory (``free_memory``, "unload
models", another model's load) and moves them back to RAM. StepVideo Text Encoder Memory
with ``keep_in_ram`` off drops them from RAM and VRAM after each encode instead; the next
new prompt reads them again from disk, prompts seen before answer from the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from ..stepvideo_core import load_text_encoder
from ..stepvideo_core.text.encoder import (NEGATIVE_PROMPT, StepVideoTextEncoder, magic_prompts,
                                           resolve_text_encoder_dirs,
                                           text_encoder_files, with_magic)
from ..stepvideo_core.text.streaming import DEFAULT_HEADROOM, PLANS, activation_bytes, stream_bytes
from ..stepvideo_core.text.tokenizer import MAX_LENGTH
from . import comfy_bridge as bridge
from .types import STEPVIDEO_CONDITIONING, STEPVIDEO_TEXT_ENCODER, StepVideoConditioning, StepVideoTextEncoderHandle

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


def format_bytes(n: int) -> str:
    """``n`` bytes as GiB (1 GiB and up) or MiB, for node texts."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def summarize_encode(cond: StepVideoConditioning, plan: str, seconds: float, cached: bool) -> str:
    """Return the text shown on an encode node: tokens used, how it ran, and any warnings."""
    llm_tokens = int(cond.encoder_attention_mask.sum()) - cond.encoder_hidden_states_2.shape[1]
    how = "from cache" if cached else f"plan {plan}, {seconds:.1f} s"
    lines = [f"Step-LLM tokens: {llm_tokens} of {MAX_LENGTH} (with BOS/EOS); {how}"]
    lines += [f"WARNING: {note}" for note in cond.notes]
    return "\n".join(lines)


class TextEncoderModules(torch.nn.Module):
    """Step-LLM (``llm``) and HunyuanCLIP (``clip``) of one encoder as one module: what ComfyUI manages.

    A container, so ComfyUI's bookkeeping attributes land on it rather than on the core's
    modules; the encoder keeps computing with its own references to the same two modules.
    """

    def __init__(self, encoder: StepVideoTextEncoder):
        super().__init__()
        self.llm = encoder.llm
        self.clip = encoder.clip


def as_handle(text_encoder) -> StepVideoTextEncoderHandle:
    """The :class:`StepVideoTextEncoderHandle` of a STEPVIDEO_TEXT_ENCODER value (a bare core encoder is wrapped)."""
    if isinstance(text_encoder, StepVideoTextEncoderHandle):
        return text_encoder
    if isinstance(text_encoder, StepVideoTextEncoder):
        return StepVideoTextEncoderHandle(encoder=text_encoder)
    raise TypeError("StepVideo: text_encoder must come from StepVideoTextEncoderLoader")


def patcher_load_device(encoder: StepVideoTextEncoder, offload: torch.device) -> torch.device:
    """Where ComfyUI places the weights for an encode: the compute device for the ``auto`` and
    ``resident`` plans; for ``stream`` and ``cpu`` the offload device (RAM), where those plans keep
    them (``stream`` copies one layer at a time to the GPU itself)."""
    return encoder.device if encoder.plan in ("auto", "resident") else torch.device(offload)


def place_weights(handle: StepVideoTextEncoderHandle, batch: int = 1, length: int = MAX_LENGTH) -> None:
    """Put the weights where the next encode computes from them, and free the VRAM it needs.

    Inside ComfyUI through its model management (``load_models_gpu``): ``resident`` loads every
    weight on the GPU; ``auto`` lets ComfyUI load what fits while keeping one layer's streaming
    room free (the layers it leaves in RAM are then streamed: the plan is chosen afterwards from
    where the weights are); ``stream``/``cpu`` are accounted where they rest, in RAM, and
    ``stream`` gets one layer's room on the GPU. Outside ComfyUI: the streaming room is freed,
    the weights stay where they rest (the encoder copies what it needs).
    """
    encoder, patcher = handle.encoder, handle.patcher
    uses_device = encoder.device.type != "cpu" and encoder.plan != "cpu"
    streaming = stream_bytes(encoder.llm, batch, length)
    if patcher is None:
        if uses_device:
            bridge.free_memory(streaming, encoder.device)
        return
    if patcher.load_device != encoder.device or not uses_device:
        bridge.load_models([patcher])  # registered where the weights rest: nothing moves
        if uses_device:
            bridge.free_memory(streaming, encoder.device)
    elif encoder.plan == "resident":
        working = activation_bytes(encoder.llm.config, batch, length, encoder.dtype) + DEFAULT_HEADROOM
        bridge.load_models([patcher], memory_required=working, full=True)
    else:
        bridge.load_models([patcher], memory_required=streaming)


def release_text_encoder(handle: StepVideoTextEncoderHandle) -> int:
    """Drop the encoder's weights from RAM and every device; returns the bytes dropped (0: already gone).

    Inside ComfyUI the model leaves ComfyUI's loaded models first, without the copy back to RAM
    that an ordinary unload makes; the next uncached encode reads the weights from the files.
    """
    encoder = handle.encoder
    if encoder.weights_released:
        return 0
    size = encoder.weight_bytes()
    bridge.unload_model(handle.patcher, drop=encoder.release_weights)
    return size


def encode_prompt(text_encoder, prompt: str) -> dict:
    """Encode one prompt with a progress bar and interrupt checks; return the node output dict.

    A handle with ``keep_in_ram`` off has its weights dropped afterwards (also after an error).
    """
    handle = as_handle(text_encoder)
    encoder = handle.encoder
    notes = tuple(encoder.notes([prompt]))
    cached = encoder.is_cached(prompt)
    reread = released = 0
    bar = bridge.progress_bar(len(encoder.llm.layers) + 1)

    def on_step(done: int, total: int) -> None:
        bridge.check_interrupt()
        bar.update_absolute(done, total)

    start = time.perf_counter()
    try:
        if not cached:
            reread = encoder.weight_bytes() if encoder.load_weights() else 0
            place_weights(handle)
        out = encoder.encode([prompt], callback=on_step)
    finally:
        if not handle.keep_in_ram:
            released = release_text_encoder(handle)
    cond = StepVideoConditioning(prompt=prompt, notes=notes, **out)
    text = summarize_encode(cond, encoder.last_plan or "-", time.perf_counter() - start, cached)
    if reread:
        text += f"\nweights read again from disk ({format_bytes(reread)})"
    if released:
        text += f"\nweights released from RAM and VRAM ({format_bytes(released)}; keep_in_ram off)"
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
        "rests in CPU memory and runs on the GPU layer by layer when it does not fit. Inside ComfyUI both are "
        "ComfyUI-managed models (loaded for encoding, unloaded when ComfyUI needs the memory); to drop them "
        "from RAM after encoding, add StepVideo Text Encoder Memory."
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
                               "layer from RAM, else CPU (inside ComfyUI: ComfyUI loads what fits, the other "
                               "layers are streamed). resident / stream / cpu force one.",
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
        """Return the UI summary and a :class:`StepVideoTextEncoderHandle` of the loaded encoders."""
        if weight_dtype not in LLM_DTYPES:
            raise ValueError(f"StepVideo: unknown weight_dtype {weight_dtype!r}; expected one of {list(LLM_DTYPES)}")
        llm_path = bridge.resolve_model_path(TEXT_FOLDER, step_llm)
        clip_path = bridge.resolve_model_path(TEXT_FOLDER, hunyuan_clip)
        offload = bridge.offload_device()
        start = time.perf_counter()
        encoder = load_text_encoder(llm_path, clip_path, dtype=LLM_DTYPES[weight_dtype], device=bridge.torch_device(),
                                    plan=device_plan, alibi=bool(alibi), weights_device=offload,
                                    free_vram=bridge.free_vram)
        patcher = bridge.model_patcher(TextEncoderModules(encoder), patcher_load_device(encoder, offload), offload)
        handle = StepVideoTextEncoderHandle(encoder=encoder, patcher=patcher)
        summary = encoder.describe() + f"\nloaded in {time.perf_counter() - start:.1f} s"
        if patcher is not None:
            summary += (f"\nComfyUI-managed ({format_bytes(bridge.module_bytes(patcher.model))}): loaded to "
                        f"{patcher.load_device} for encoding, back to {offload} when ComfyUI unloads it")
        log.info(summary.replace("\n", "; "))
        return {"ui": {"text": [summary]}, "result": (handle,)}


# Which official prompt pair a text node uses: the model it encodes for (T2V and Turbo share theirs).
MAGIC_MODES = {"Step-Video-T2V": "t2v", "Step-Video-TI2V": "ti2v"}
CUSTOM_NEGATIVE = "as written"


def magic_input() -> tuple:
    """The optional ``magic`` combo: whose official positive suffix ``add_magic`` appends.

    Optional (not required) so that workflows saved before it existed still validate in the API."""
    return (list(MAGIC_MODES), {"default": "Step-Video-T2V",
                                "tooltip": "Whose official suffix add_magic appends: Step-Video-T2V (also Turbo): "
                                           + magic_prompts("t2v")[0] + " / Step-Video-TI2V (image-to-video): "
                                           + magic_prompts("ti2v")[0]})


def positive_text(prompt: str, add_magic: bool, magic: str = "Step-Video-T2V") -> str:
    """The positive prompt as encoded: ``prompt`` plus the official suffix of ``magic``'s model when asked."""
    if magic not in MAGIC_MODES:
        raise ValueError(f"StepVideo: unknown magic {magic!r}; expected one of {list(MAGIC_MODES)}")
    return with_magic(prompt, bool(add_magic), magic_prompts(MAGIC_MODES[magic])[0])


def negative_text(prompt: str, official: str = CUSTOM_NEGATIVE) -> str:
    """The negative prompt as encoded: ``prompt`` as written, or the official negative of ``official``'s model."""
    if official == CUSTOM_NEGATIVE:
        return prompt
    if official not in MAGIC_MODES:
        raise ValueError(f"StepVideo: unknown official negative {official!r}; expected one of "
                         f"{[CUSTOM_NEGATIVE, *MAGIC_MODES]}")
    return magic_prompts(MAGIC_MODES[official])[1]


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
                    "tooltip": "Append the official positive suffix (see magic): " + with_magic("", True),
                }),
            },
            "optional": {"magic": magic_input()},
        }

    def encode(self, text_encoder, prompt, add_magic, magic="Step-Video-T2V"):
        """Return the UI note and the STEPVIDEO_CONDITIONING of ``prompt`` (+ ``magic``'s suffix if asked)."""
        return encode_prompt(text_encoder, positive_text(prompt, add_magic, magic))


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
            },
            "optional": {
                "official": ([CUSTOM_NEGATIVE, *MAGIC_MODES], {
                    "default": CUSTOM_NEGATIVE,
                    "tooltip": "as written: encode the prompt above. Step-Video-T2V / Step-Video-TI2V: encode that "
                               "model's official negative prompt instead (TI2V: " + magic_prompts("ti2v")[1] + ")."}),
            },
        }

    def encode(self, text_encoder, prompt, official=CUSTOM_NEGATIVE):
        """Return the UI note and the STEPVIDEO_CONDITIONING of the negative ``prompt`` as written
        (or of the official negative prompt of ``official``'s model)."""
        return encode_prompt(text_encoder, negative_text(prompt, official))


class StepVideoTextEncoderMemory:
    """Chooses whether the text encoder's weights stay in RAM between encodes."""

    CATEGORY = "StepVideo/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = (STEPVIDEO_TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The same text encoder (weights and prompt cache shared) with this memory choice.",)
    DESCRIPTION = (
        "Put between StepVideo Text Encoder Loader and the encode nodes. keep_in_ram off: after each encode the "
        "Step-LLM and HunyuanCLIP weights (39 GB for the release) are dropped from RAM and VRAM, so they do not "
        "sit beside the DiT while it samples; the next new prompt reads them again from disk, prompts encoded "
        "before come from the cache at once. On: the weights stay, as without this node."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (STEPVIDEO_TEXT_ENCODER,),
                "keep_in_ram": ("BOOLEAN", {
                    "default": False, "label_on": "keep in RAM", "label_off": "unload after encode",
                    "tooltip": "Off: drop the weights after each encode (a new prompt reads them again from disk; "
                               "seen prompts come from the cache). On: keep them loaded between encodes.",
                }),
            }
        }

    def apply(self, text_encoder, keep_in_ram):
        """Return the UI note and the handle with ``keep_in_ram`` set (the encoder itself is shared)."""
        handle = dataclasses.replace(as_handle(text_encoder), keep_in_ram=bool(keep_in_ram))
        if not handle.keep_in_ram and not handle.encoder.can_release:
            raise ValueError("StepVideo: this text encoder was not loaded from files, so it cannot read its weights "
                             "again after dropping them; use StepVideo Text Encoder Loader")
        text = ("weights kept in RAM between encodes" if handle.keep_in_ram else
                f"weights dropped after each encode ({format_bytes(handle.encoder.weight_bytes())}); new prompts "
                f"read them again from disk")
        return {"ui": {"text": [text]}, "result": (handle,)}


NODE_CLASS_MAPPINGS = {
    "StepVideoTextEncoderLoader": StepVideoTextEncoderLoader,
    "StepVideoTextEncoderMemory": StepVideoTextEncoderMemory,
    "StepVideoTextEncode": StepVideoTextEncode,
    "StepVideoNegativeTextEncode": StepVideoNegativeTextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StepVideoTextEncoderLoader": "StepVideo Text Encoder Loader",
    "StepVideoTextEncoderMemory": "StepVideo Text Encoder Memory",
    "StepVideoTextEncode": "StepVideo Text Encode",
    "StepVideoNegativeTextEncode": "StepVideo Negative Text Encode",
}
