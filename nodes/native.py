"""Native-family nodes: Step-Video as a ComfyUI model, for KSampler, SamplerCustomAdvanced and friends.

``StepVideoNativeModelLoader`` gives a core ``MODEL`` (a ComfyUI ModelPatcher around the pack's DiT,
see :mod:`.native_model`); the other nodes give what ComfyUI's samplers take for it: CONDITIONING
from the pack's text encoder (or from any STEPVIDEO_CONDITIONING, so the negative-prompt node and
the encoder cache are reused), an empty video LATENT in the pack's size rules, the official sigma
schedule as SIGMAS, and the pack's seeded noise as NOISE (a seed then means the same video as in
StepVideoSampler).

The family needs ComfyUI (``comfy`` is imported lazily, in :mod:`.native_model`); outside ComfyUI
the module still imports and registers nothing (:data:`NODE_CLASS_MAPPINGS` is empty).
"""

from __future__ import annotations

import importlib.util
import logging
import time

import torch

from ..stepvideo_core.attention import BACKENDS, check_backend
from ..stepvideo_core.checks import finite_float
from ..stepvideo_core.sampling.noise import initial_noise, latent_shape
from ..stepvideo_core.sampling.schedule import PRESETS, time_shift
from . import comfy_bridge as bridge
from .model import DIT_FOLDER, WEIGHT_CHOICES, StepVideoModelLoader, format_count, resolve_weight_choice
from .sampler import MAX_SEED, conditioning_dict, video_size_inputs
from .types import STEPVIDEO_CONDITIONING

log = logging.getLogger("StepVideo")

CATEGORY = "StepVideo/native"
DEFAULT_SHIFT = PRESETS["Step-Video-T2V"].shift
DEFAULT_STEPS = PRESETS["Step-Video-T2V"].steps


def comfy_available() -> bool:
    """True inside ComfyUI: its ``folder_paths`` and model code are importable (nothing is imported
    when they are not there)."""
    return bridge.in_comfyui() and importlib.util.find_spec("comfy.model_patcher") is not None


def _native():
    """The :mod:`.native_model` module (imports ComfyUI's model code)."""
    from . import native_model
    return native_model


# --------------------------------------------------------------------------- model


class StepVideoNativeModelLoader:
    """Loads the Step-Video-T2V DiT as a ComfyUI MODEL (for KSampler and the other core samplers)."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Step-Video DiT as a ComfyUI model: KSampler, SamplerCustomAdvanced, EasyCache, "
                       "ModelSamplingSD3, ... (flow matching, shift 13).",)
    DESCRIPTION = (
        "Loads the Step-Video-T2V transformer (an official stepvideo-t2v folder, its transformer/ subfolder or "
        "one .safetensors file from models/diffusion_models) as a ComfyUI MODEL. ComfyUI manages its memory: "
        "what does not fit the GPU stays in RAM and is copied in layer by layer (ComfyUI's partial loading). "
        "Use StepVideo Native Text Encode for the prompts, StepVideo Empty Latent for the size, and "
        "StepVideo Scheduler / StepVideo Noise for the official schedule and the pack's seeded noise."
    )

    @classmethod
    def INPUT_TYPES(cls):
        base = StepVideoModelLoader.INPUT_TYPES()["required"]
        return {"required": {"model": base["model"], "weight_dtype": base["weight_dtype"],
                             "attention": base["attention"]}}

    @classmethod
    def IS_CHANGED(cls, model, weight_dtype, attention):
        return StepVideoModelLoader.IS_CHANGED(model, weight_dtype, attention)

    def load(self, model, weight_dtype, attention):
        """Return the UI summary and the MODEL (a ComfyUI ModelPatcher) for entry ``model``."""
        if weight_dtype not in WEIGHT_CHOICES:
            raise ValueError(f"StepVideo: unknown weight_dtype {weight_dtype!r}; expected one of {list(WEIGHT_CHOICES)}")
        if attention not in BACKENDS:
            raise ValueError(f"StepVideo: unknown attention {attention!r}; expected one of {list(BACKENDS)}")
        path = bridge.resolve_model_path(DIT_FOLDER, model)
        device = bridge.torch_device()
        dtype, weight_format = resolve_weight_choice(weight_dtype, device)
        check_backend(attention, device, dtype)
        start = time.perf_counter()
        patcher = _native().load_native_patcher(path, dtype, weight_format, attention)
        dit = patcher.model.diffusion_model
        cfg = dit.config
        stored = patcher.model_size()
        dtype_name = str(dit.compute_dtype).replace("torch.", "")
        if dit.weight_format == "fp8_scaled":
            dtype_name = f"fp8_scaled blocks, compute {dtype_name}"
        kind = ("Step-Video-TI2V (image-to-video: add StepVideo Native Image to Video before the sampler)"
                if dit.is_ti2v else "Step-Video-T2V (text-to-video)")
        summary = "\n".join([
            f"Step-Video DiT (native): {model}",
            kind,
            f"{cfg.num_layers} layers, width {cfg.inner_dim}; {format_count(dit.num_parameters())} parameters, "
            f"{dtype_name} ({stored / 1e9:.2f} GB)",
            f"load device {patcher.load_device}, offload device {patcher.offload_device} (ComfyUI-managed)",
            f"attention {attention}, loaded in {time.perf_counter() - start:.1f} s",
        ])
        log.info(summary.replace("\n", "; "))
        return {"ui": {"text": [summary]}, "result": (patcher,)}


# --------------------------------------------------------------------------- conditioning


class StepVideoNativeTextEncode:
    """Encodes a prompt with the pack's text encoder into a ComfyUI CONDITIONING."""

    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Step-LLM states with the HunyuanCLIP states and the cross-attention mask, for KSampler "
                       "and the other core samplers on a StepVideo native model.",)
    DESCRIPTION = (
        "StepVideo Text Encode for the native model: the same encoder, conventions and cache, with a "
        "CONDITIONING output. Turn add_magic off for a negative prompt (or convert the output of StepVideo "
        "Negative Text Encode with StepVideo Native Conditioning)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from .text import StepVideoTextEncode

        spec = StepVideoTextEncode.INPUT_TYPES()  # the same widgets (and tooltips) as the text family's
        return {"required": {name: spec["required"][name] for name in ("text_encoder", "prompt", "add_magic")},
                "optional": dict(spec["optional"])}

    def encode(self, text_encoder, prompt, add_magic, magic="Step-Video-T2V"):
        """Return the UI note and the CONDITIONING of ``prompt`` (+ ``magic``'s suffix if asked)."""
        from .text import StepVideoTextEncode

        out = StepVideoTextEncode().encode(text_encoder=text_encoder, prompt=prompt, add_magic=add_magic, magic=magic)
        (cond,) = out["result"]
        return {"ui": out.get("ui", {}), "result": (_native().native_conditioning(conditioning_dict(cond, "prompt")),)}


class StepVideoNativeConditioning:
    """Turns a STEPVIDEO_CONDITIONING (e.g. StepVideo Negative Text Encode) into a ComfyUI CONDITIONING."""

    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The same text embeddings as a CONDITIONING for the core samplers.",)
    DESCRIPTION = "Converts the pack's conditioning (from any StepVideo text encode node) for KSampler and friends."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": (STEPVIDEO_CONDITIONING, {
            "tooltip": "From StepVideo Text Encode or StepVideo Negative Text Encode."})}}

    def convert(self, conditioning):
        return (_native().native_conditioning(conditioning_dict(conditioning, "conditioning")),)


class StepVideoNativeImageToVideo:
    """Step-Video-TI2V on the native MODEL: adds the first frame and the motion score to both conditionings."""

    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("The positive conditioning with the image condition and motion score.",
                       "The negative conditioning with the same (both guidance branches see the image).",
                       "An empty latent of this size, for the sampler.")
    DESCRIPTION = (
        "Image-to-video with a Step-Video-TI2V native model (like core's WanImageToVideo): the first frame of the "
        "image is resized to cover width x height, centre-cropped and encoded by the VAE as the first latent "
        "frame (the rest are zeros); ComfyUI concatenates it to the latents before every DiT call."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from .image import StepVideoImageToVideo

        spec = StepVideoImageToVideo.INPUT_TYPES()["required"]
        return {"required": {
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            **{name: spec[name] for name in ("vae", "image", "width", "height", "frames")},
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            "motion_score": spec["motion_score"], "seed": spec["seed"],
        }}

    def encode(self, positive, negative, vae, image, width, height, frames, batch_size, motion_score, seed):
        """Return (positive, negative, latent) with the TI2V image condition; bad inputs raise ValueError."""
        from .image import encode_first_frame

        motion_score = finite_float(motion_score, "motion_score")
        condition = encode_first_frame(vae, image, width, height, frames, seed)   # [1, F, C, h, w]
        native = _native()
        _, f, c, h, w = condition.shape  # the empty latent has the VAE's channels (64 for the release)
        latent = {"samples": torch.zeros((int(batch_size), c, f, h, w), device=native.intermediate_device())}
        return (native.with_image_condition(positive, condition, motion_score),
                native.with_image_condition(negative, condition, motion_score), latent)


# --------------------------------------------------------------------------- latent, sigmas, noise


class StepVideoEmptyLatent:
    """An empty Step-Video latent of the requested video size (for the core samplers)."""

    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros [batch, 64, frames/17*3, height/16, width/16].",)
    DESCRIPTION = ("An empty latent for the native Step-Video model. Sizes follow the VAE: width and height "
                   "multiples of 16, frames a multiple of 17 (every 17 frames are 3 latent frames).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **video_size_inputs(),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    def generate(self, width, height, frames, batch_size):
        """Return ``({"samples": zeros [B, 64, F, h, w]},)``; off-grid sizes raise naming the nearest valid ones."""
        native = _native()
        b, f, c, h, w = latent_shape(width, height, frames, batch_size, native.LATENT_CHANNELS)
        return ({"samples": torch.zeros((b, c, f, h, w), device=native.intermediate_device())},)


def official_sigmas(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """The official schedule in ComfyUI's convention: fp32 [steps + 1] falling from 1 (noise) to 0.

    ``sigma_c = shift*s / (1 + (shift-1)*s)`` with ``s = linspace(1, 0, n + 1)``, so ``1 - sigma_c``
    is bit for bit :func:`stepvideo_core.flow_match_sigmas` (what the DiT is given).  ``denoise`` < 1
    takes the last ``steps + 1`` values of the schedule for ``int(steps / denoise)`` steps (as
    ComfyUI's BasicScheduler does); 0 gives an empty schedule (nothing to do).
    """
    steps = int(steps)
    shift, denoise = finite_float(shift, "shift"), finite_float(denoise, "denoise")
    if steps < 1:
        raise ValueError(f"StepVideo: steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"StepVideo: shift must be positive, got {shift}")
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    total = steps if denoise >= 0.9999 else int(steps / min(denoise, 1.0))
    s = torch.linspace(1, 0, total + 1, dtype=torch.float32)
    return time_shift(s, shift)[-(steps + 1):].contiguous()


class StepVideoScheduler:
    """The official Step-Video-T2V sigma schedule (shift 13, Turbo 17) as SIGMAS."""

    CATEGORY = CATEGORY
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("steps + 1 sigmas from 1 (noise) to 0, the official flow-matching schedule.",)
    DESCRIPTION = ("The official schedule (StepFun's FlowMatchDiscreteScheduler) for SamplerCustomAdvanced: "
                   "base model 50 steps, shift 13; Turbo 15 steps, shift 17. KSampler's own schedulers on the "
                   "native model use the same shift but other spacings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 1000}),
            "shift": ("FLOAT", {"default": DEFAULT_SHIFT, "min": 0.01, "max": 100.0, "step": 0.1,
                                "tooltip": "13 for Step-Video-T2V, 17 for Turbo."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def get_sigmas(self, steps, shift, denoise):
        return (official_sigmas(steps, shift, denoise),)


class StepVideoSeededNoise:
    """A NOISE value (``seed``, ``generate_noise(latent)``): the pack's seeded noise in ComfyUI's layout.

    The values are :func:`stepvideo_core.sampling.initial_noise` for the official layout
    ``[B, F, C, h, w]`` (float64 draw on the CPU, rounded to bf16), moved to ``[B, C, F, h, w]``:
    the same initial noise StepVideoSampler uses for the seed.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if samples.ndim != 5:
            raise ValueError(f"StepVideo Noise needs a video latent [B, C, F, h, w], got shape {list(samples.shape)}")
        b, c, f, h, w = samples.shape
        noise = initial_noise((b, f, c, h, w), self.seed)
        return noise.to(torch.float32).movedim(1, 2).contiguous()


class StepVideoNoise:
    """The pack's seeded noise as NOISE for SamplerCustomAdvanced: a seed gives the same video as StepVideoSampler."""

    CATEGORY = CATEGORY
    FUNCTION = "get_noise"
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)
    OUTPUT_TOOLTIPS = ("Seeded noise drawn on the CPU (the same on every machine).",)
    DESCRIPTION = ("Noise for SamplerCustomAdvanced drawn exactly as StepVideoSampler draws it (CPU generator, "
                   "float64, rounded to bf16), so a seed means the same initial noise on both paths.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise_seed": ("INT", {"default": 1234, "min": 0, "max": MAX_SEED,
                                                    "control_after_generate": True})}}

    def get_noise(self, noise_seed):
        return (StepVideoSeededNoise(noise_seed),)


# --------------------------------------------------------------------------- registration

# node id -> (class, display name): every node of the family, registered below when ComfyUI is there
# (workflows/build.py reads it without ComfyUI to write the native workflows).
NATIVE_NODES = {
    "StepVideoNativeModelLoader": (StepVideoNativeModelLoader, "StepVideo Native Model Loader"),
    "StepVideoNativeTextEncode": (StepVideoNativeTextEncode, "StepVideo Native Text Encode"),
    "StepVideoNativeConditioning": (StepVideoNativeConditioning, "StepVideo Native Conditioning"),
    "StepVideoNativeImageToVideo": (StepVideoNativeImageToVideo, "StepVideo Native Image to Video"),
    "StepVideoEmptyLatent": (StepVideoEmptyLatent, "StepVideo Empty Latent"),
    "StepVideoScheduler": (StepVideoScheduler, "StepVideo Scheduler"),
    "StepVideoNoise": (StepVideoNoise, "StepVideo Noise"),
}

if comfy_available():
    NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NATIVE_NODES.items()}
    NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NATIVE_NODES.items()}
else:  # plain Python (tests, scripts): a MODEL needs ComfyUI, so the family is not offered
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
