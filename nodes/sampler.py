"""Sampler-family node: StepVideoSampler (text conditioning + model handle -> LATENT).

The node is thin: it turns widgets into a call of :func:`stepvideo_core.sampling.sample`,
asks the memory planner how many blocks fit on the GPU, and wires ComfyUI's progress
bar, previews, interrupt and memory management in through :mod:`comfy_bridge`.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import nullcontext
from typing import Mapping, Optional

from ..stepvideo_core.offload import SamplingInterrupted
from ..stepvideo_core.pipeline import check_plan
from ..stepvideo_core.pipeline import plan_blocks as core_plan_blocks
from ..stepvideo_core.sampling import CONDITIONING_KEYS, DEFAULT_PRESET, PRESETS, resolve_settings, sample
from ..stepvideo_core.sampling.preview import default_factors, fit_from_vae, preview_frame
from ..stepvideo_core.vae.latents import to_comfy_latent
from . import comfy_bridge as bridge
from .types import STEPVIDEO_CONDITIONING, STEPVIDEO_IMAGE_CONDITION, STEPVIDEO_MODEL

log = logging.getLogger("StepVideo")

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def conditioning_dict(cond, name: str) -> dict:
    """The DiT inputs of a STEPVIDEO_CONDITIONING value (the text family's dataclass, or a plain dict)."""
    if hasattr(cond, "dit_inputs"):
        return dict(cond.dit_inputs())
    if isinstance(cond, Mapping):
        return {k: cond.get(k) for k in CONDITIONING_KEYS}
    raise TypeError(f"StepVideo: {name} must be a STEPVIDEO_CONDITIONING (from StepVideoTextEncode), "
                    f"got {type(cond).__name__}")


def settings(preset: str, steps: int, cfg: float, shift: float) -> dict:
    """Preset values, each replaced by its widget when the widget is not 0 (0 = "from the preset")."""
    return resolve_settings(preset, steps or None, cfg or None, shift or None)


def image_inputs(model_handle, image_condition, width: int, height: int, frames: int) -> dict:
    """The sampler's image-to-video keyword arguments (``condition``, ``motion_score``), or {} for T2V.

    Exists so that a graph that cannot be what the user meant fails before any weight moves, with the
    node names to fix it: a TI2V model without StepVideo Image to Video, an image condition given to a
    T2V model, or a condition made for another video size than the sampler's.
    """
    ti2v = bool(getattr(model_handle.config, "is_ti2v", False))
    if image_condition is None:
        if ti2v:
            raise ValueError("StepVideo Sampler: the model is Step-Video-TI2V (image-to-video): connect StepVideo "
                             "Image to Video (a Load Image and the VAE) to the image_condition input")
        return {}
    if not ti2v:
        raise ValueError("StepVideo Sampler: an image_condition is connected but the model is Step-Video-T2V "
                         "(text-to-video); load a Step-Video-TI2V transformer (stepvideo-ti2v) or disconnect it")
    made_for = (image_condition.width, image_condition.height, image_condition.frames)
    if made_for != (width, height, frames):
        raise ValueError(f"StepVideo Sampler: the image condition was made for {made_for[0]}x{made_for[1]}x"
                         f"{made_for[2]} (StepVideo Image to Video) but the sampler is set to {width}x{height}x"
                         f"{frames}; set both to the same width, height and frames")
    return {"condition": image_condition.latent, "motion_score": image_condition.motion_score}


def plan_blocks(handle, width: int, height: int, frames: int, guided: bool) -> dict:
    """Decide ``blocks_on_device`` and CFG batching for this run; returns the planner's dict.

    The rule is the headless pipeline's (:func:`stepvideo_core.pipeline.plan_blocks`); on a
    GPU ComfyUI is first asked to free what the fully resident run would need, and the
    plan is then fitted into the free memory ComfyUI reports; on the CPU the plan checks
    the run's activations against the available RAM.
    """
    common = dict(device=handle.device, compute_dtype=handle.dtype, weight_format=handle.weight_format,
                  attention=handle.attention, width=width, height=height, frames=frames, guided=guided)
    if handle.device.type != "cpu":  # also for "all": other models (e.g. the text encoder) may hold the GPU
        wanted = core_plan_blocks(handle.config, blocks_on_device=handle.config.num_layers, free_bytes=1 << 62,
                                  **common)
        bridge.free_memory(wanted["peak_bytes"] + wanted["reserve_bytes"], handle.device)
    if handle.device.type == "cpu":  # the core plans the host RAM (what the system has available)
        return core_plan_blocks(handle.config, blocks_on_device=handle.blocks_on_device, free_bytes=None,
                                **common)
    free = bridge.free_vram(handle.device)
    return core_plan_blocks(handle.config, blocks_on_device=handle.blocks_on_device,
                            free_bytes=1 << 62 if free is None else free, **common)


_FITTED_FACTORS = weakref.WeakKeyDictionary()  # VAE module -> LatentRGB (fitted once per loaded VAE)


def preview_factors(preview_vae):
    """64->RGB preview factors: fitted once for ``preview_vae`` (a STEPVIDEO_VAE) when given,
    else the shipped ones (None: grey previews).  A fit costs one encode of four 64x64 clips."""
    if preview_vae is None:
        return default_factors()
    factors = _FITTED_FACTORS.get(preview_vae.vae)
    if factors is None:
        from .vae import run_on_device
        factors = _FITTED_FACTORS[preview_vae.vae] = run_on_device(preview_vae, fit_from_vae)
    return factors


class StepVideoSampler:
    """Denoises a Step-Video latent from text conditioning (flow matching, Euler, CFG)."""

    CATEGORY = "StepVideo/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Video latent [B, 64, frames/17*3, height/16, width/16] for StepVideoVAEDecode.",)
    DESCRIPTION = ("Runs the Step-Video DiT: the official flow-matching schedule, Euler steps and "
                   "classifier-free guidance. Blocks that do not fit on the GPU are streamed from RAM. With a "
                   "Step-Video-TI2V model, connect StepVideo Image to Video to image_condition (image-to-video).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (STEPVIDEO_MODEL, {"tooltip": "From StepVideo Model Loader."}),
                "positive": (STEPVIDEO_CONDITIONING, {"tooltip": "The prompt, from StepVideo Text Encode."}),
                "negative": (STEPVIDEO_CONDITIONING, {"tooltip": "The negative prompt (used when cfg > 1)."}),
                "preset": (list(PRESETS), {
                    "default": DEFAULT_PRESET,
                    "tooltip": "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
                }),
                "width": ("INT", {"default": 992, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Multiple of 16 (official: 992)."}),
                "height": ("INT", {"default": 544, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Multiple of 16 (official: 544)."}),
                "frames": ("INT", {"default": 204, "min": 17, "max": 1020, "step": 17,
                                   "tooltip": "Multiple of 17 (every 17 frames are 3 latent frames); "
                                              "official: 204 = 8 s at 25 fps."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                  "tooltip": "0 = the preset's (50, Turbo 15)."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "0 = the preset's (9, Turbo 5); 1 = no guidance (faster)."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Time shift of the schedule; 0 = the preset's (13, Turbo 17)."}),
                "seed": ("INT", {"default": 1234, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise is drawn on the CPU, so a seed gives the same video on "
                                            "every machine."}),
            },
            "optional": {
                "preview_vae": ("STEPVIDEO_VAE", {
                    "tooltip": "Optional: the VAE, to colour the step previews. A 64->RGB map is fitted once per "
                               "loaded VAE from a few synthetic colour clips; without it previews are grey."}),
                "image_condition": (STEPVIDEO_IMAGE_CONDITION, {
                    "tooltip": "Image-to-video (a Step-Video-TI2V model): the first frame and motion score from "
                               "StepVideo Image to Video, made for this width, height and frames."}),
            },
        }

    def sample(self, model, positive, negative, preset, width, height, frames, steps, cfg, shift, seed,
               preview_vae=None, image_condition=None):
        """Return the UI summary and ``({"samples": [B, C, F, h, w]},)``.

        A NaN/Inf cfg or shift raises ValueError (a JSON NaN passes ComfyUI's min/max check);
        latents that turn NaN/Inf raise NonFiniteError naming the step: a failed execution,
        never a black video.
        """
        run = settings(preset, steps, cfg, shift)
        image = image_inputs(model, image_condition, width, height, frames)
        guided = run["cfg"] > 1.0
        pos = conditioning_dict(positive, "positive")
        neg = conditioning_dict(negative, "negative") if guided else None
        factors = preview_factors(preview_vae)  # before planning: fitting may load the VAE onto the GPU
        plan = plan_blocks(model, width, height, frames, guided)
        check_plan(plan)
        transformer = model.transformer
        transformer.attention_backend = model.attention
        streamed = plan["blocks_on_device"] < model.config.num_layers
        progress = bridge.progress_bar(run["steps"])

        def on_step(i, n, latents):
            progress.update_absolute(i, n, bridge.preview_image(preview_frame(latents, factors)))

        adapters = nullcontext()
        if model.adapters:
            from ..stepvideo_core.lora.apply import attached
            adapters = attached(transformer, model.adapters, blocks_on_device=plan["blocks_on_device"])
        start = time.perf_counter()
        try:
            with adapters:
                latents = sample(transformer, pos, neg, width=width, height=height, frames=frames,
                                 steps=run["steps"], cfg=run["cfg"], shift=run["shift"], seed=seed,
                                 device=model.device,
                                 blocks_on_device=plan["blocks_on_device"] if streamed else None,
                                 batch_cfg=plan["batch_cfg"], on_step=on_step,
                                 should_stop=bridge.interrupt_requested, cuda_api=bridge.cuda_api(), **image)
        except SamplingInterrupted:
            bridge.check_interrupt()  # ComfyUI's own interrupt exception (weights are already home)
            raise
        finally:
            bridge.empty_cache()
        seconds = time.perf_counter() - start
        mode = f"image-to-video, motion score {image['motion_score']:g}; " if image else ""
        summary = (f"{mode}{run['steps']} steps, cfg {run['cfg']:g}, shift {run['shift']:g}, seed {seed}; "
                   f"{width}x{height}x{frames} -> latent {list(latents.shape)}; {plan['message']}"
                   f"{'' if plan.get('batch_cfg', True) else ' (CFG one branch at a time)'}; {seconds:.1f} s")
        log.info("StepVideo sampler: %s", summary)
        return {"ui": {"text": [summary]}, "result": ({"samples": to_comfy_latent(latents)},)}


NODE_CLASS_MAPPINGS = {"StepVideoSampler": StepVideoSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"StepVideoSampler": "StepVideo Sampler"}
