"""Sampler-family node: StepVideoSampler (text conditioning + model handle -> LATENT).

The node is thin: it turns widgets into one run of :func:`stepvideo_core.sampling.run.plan_and_sample`
(the headless pipeline's orchestration: memory plan, adapters, compiled blocks, ``sample``), and wires
ComfyUI's memory management, progress bar, previews and interrupt in through :mod:`comfy_bridge`.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Mapping, Optional

from ..stepvideo_core.offload import SamplingInterrupted
from ..stepvideo_core.offload.kept import kept_weights, resident_bytes
from ..stepvideo_core.sampling import (CONDITIONING_KEYS, DEFAULT_PRESET, PRESETS, Placement, SamplingSettings,
                                       resolve_settings, sample)
from ..stepvideo_core.sampling.cache import (CACHE_MODES, DEFAULT_END, DEFAULT_START, DEFAULT_THRESHOLDS,
                                             StepCache)
from ..stepvideo_core.sampling.cache import summary as cache_summary
from ..stepvideo_core.sampling.run import DiTSetup, plan_and_sample
from ..stepvideo_core.sampling.preview import fit_from_vae, preview_frame
from ..stepvideo_core.vae.config import FRAME_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR
from ..stepvideo_core.vae.latents import to_comfy_latent
from . import comfy_bridge as bridge
from . import multi_gpu
from .types import STEPVIDEO_CONDITIONING, STEPVIDEO_IMAGE_CONDITION, STEPVIDEO_MODEL, STEPVIDEO_VAE

log = logging.getLogger("StepVideo")

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def video_size_inputs(frames: int = 204, frames_tip: str = "official: 204 = 8 s at 25 fps.",
                      width_tip: str = "") -> dict:
    """The width/height/frames widgets every node sizing a video shares (limits of the VAE's grid).

    ``frames`` is the default length, ``frames_tip`` ends the frames tooltip, ``width_tip`` is added to the
    width tooltip (what the node does with the size).
    """
    cell, chunk = SPATIAL_FACTOR, FRAME_CHUNK
    return {
        "width": ("INT", {"default": 992, "min": cell, "max": 4096, "step": cell,
                          "tooltip": f"Multiple of {cell} (official: 992).{' ' + width_tip if width_tip else ''}"}),
        "height": ("INT", {"default": 544, "min": cell, "max": 4096, "step": cell,
                           "tooltip": f"Multiple of {cell} (official: 544)."}),
        "frames": ("INT", {"default": frames, "min": chunk, "max": 60 * chunk, "step": chunk,
                           "tooltip": f"Multiple of {chunk} (every {chunk} frames are {LATENTS_PER_CHUNK} latent "
                                      f"frames); {frames_tip}"}),
    }


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


def step_cache(transformer, mode: str, threshold: float, start: float, end: float, preset: str,
               steps: int) -> StepCache:
    """The sampler's :class:`~stepvideo_core.sampling.cache.StepCache` from the node's cache widgets.

    Calibrated mode finds its calibration now, before any weight moves: a ``*.json`` written by
    ``python -m stepvideo_core calibrate-cache`` in ComfyUI's ``models/stepvideo_cache/`` (or
    ``$STEPVIDEO_MODELS_DIR/stepvideo_cache/``) for this model, preset and step count; none raises
    CalibrationNotFound (a ValueError) saying where it looked and how to make one.
    """
    if mode not in CACHE_MODES:
        raise ValueError(f"StepVideo Sampler: cache must be one of {list(CACHE_MODES)}, got {mode!r}")
    if mode == "off":
        return StepCache()
    cache = StepCache(mode=mode, threshold=threshold, start=start, end=end,
                      sources=tuple(bridge.step_cache_dirs()) if mode == "calibrated" else ())
    return cache.resolved(transformer, preset, steps)


def dit_setup(handle) -> DiTSetup:
    """The core's :class:`~stepvideo_core.sampling.run.DiTSetup` of a model handle (its dtype, weights, choices)."""
    return DiTSetup(compute_dtype=handle.dtype, weight_format=handle.weight_format, attention=handle.attention,
                    blocks_on_device=handle.blocks_on_device, adapters=tuple(handle.adapters),
                    compile=getattr(handle, "compile", "off"))


def make_room(handle, kept=None, keeper=None):
    """The ``make_room`` of a GPU run of ``handle`` (see :func:`stepvideo_core.sampling.run.plan_run`).

    Given the bytes the fully resident run needs, it asks ComfyUI to free them (other models, e.g. the
    text encoder, may hold the GPU) and returns the free memory ComfyUI then reports.  ``kept`` /
    ``keeper``: the resident weights an earlier run left on the GPU and their ComfyUI patcher
    (:func:`kept_resident_weights`): they count as free (this run reuses or drops them) and are not
    evicted to make room.
    """
    ours = kept.nbytes if kept is not None and kept.device == handle.device else 0

    def room(need: int) -> Optional[int]:
        if keeper is not None:
            bridge.free_memory(max(0, need - ours), handle.device, keep=[keeper])
        else:
            bridge.free_memory(need, handle.device)
        free = bridge.free_vram(handle.device)
        return None if free is None else free + ours

    return room


_KEEPERS = weakref.WeakKeyDictionary()  # transformer -> ComfyUI patcher of its resident weights kept on the GPU


def kept_resident_weights(handle):
    """(KeptWeights, ComfyUI patcher) for runs of ``handle`` that keep their resident weights on the GPU, or (None, None).

    Exists so that a run at 48/48 blocks does not upload ~60 GB before its first step every time:
    inside ComfyUI, on a GPU, the resident weights' device copies stay there after the run, and the
    patcher (:func:`comfy_bridge.kept_weights_patcher`) makes them a model ComfyUI accounts for and
    evicts when it needs the memory (another model's load, "unload models"); the next run then
    uploads again.  Outside ComfyUI nothing could evict them, and on the CPU nothing moves: (None, None).
    """
    if handle.device.type == "cpu" or handle.device == handle.offload_device or not bridge.manages_models():
        return None, None
    transformer = handle.transformer
    keeper = _KEEPERS.get(transformer)
    if keeper is not None and keeper.load_device != handle.device:  # another GPU now: give the old copies back
        bridge.unload_model(keeper)
        keeper = None
    kept = kept_weights(transformer, handle.device)
    if keeper is None:
        keeper = _KEEPERS[transformer] = bridge.kept_weights_patcher(kept, handle.device, handle.offload_device)
    return kept, keeper


_FITTED_FACTORS = weakref.WeakKeyDictionary()  # VAE module -> LatentRGB (fitted once per loaded VAE)


def preview_factors(preview_vae):
    """Return this run's latent->RGB preview factors, or None for progress without preview images.

    Fitted once per loaded VAE for ``preview_vae`` (a STEPVIDEO_VAE; one encode of four 64x64 clips).
    None without ``preview_vae`` (the pack ships no factors: only the user's VAE says what the latents'
    colours are) and when ComfyUI's preview method is "none" (then nothing is fitted either).
    """
    if preview_vae is None or not bridge.previews_enabled():
        return None
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
                **video_size_inputs(),
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
                "preview_vae": (STEPVIDEO_VAE, {
                    "tooltip": "Optional: the VAE, for step previews. A 64->RGB map is fitted once per loaded VAE "
                               "from a few synthetic colour clips; without it there is no preview image (progress "
                               "only). Previews follow ComfyUI's preview method (--preview-method or the Live "
                               "preview method setting): none turns them off."}),
                "image_condition": (STEPVIDEO_IMAGE_CONDITION, {
                    "tooltip": "Image-to-video (a Step-Video-TI2V model): the first frame and motion score from "
                               "StepVideo Image to Video, made for this width, height and frames."}),
                "cache": (list(CACHE_MODES), {
                    "default": "off",
                    "tooltip": "Step cache: skip DiT calls whose output barely changes (both CFG branches; a "
                               "skipped step reuses the last velocity and streams no weights). off: every step "
                               "(exactly the uncached video). adaptive: no calibration, skips while the change "
                               "estimated from the input change stays under cache_threshold. calibrated: reads a "
                               "calibration for this model, preset and step count from ComfyUI/models/"
                               f"{bridge.STEP_CACHE_FOLDER}/*.json, made with python -m stepvideo_core calibrate-cache "
                               "(the pack ships none it has not measured); fails when none matches. Quality with "
                               "real weights is not measured yet: compare with off."}),
                "cache_threshold": ("FLOAT", {
                    "default": DEFAULT_THRESHOLDS["adaptive"], "min": 0.0, "max": 10.0, "step": 0.01,
                    "tooltip": "Skip while the accumulated estimate stays under this; higher skips more (faster, "
                               "further from the uncached video); 0 never skips. Calibrated also skips at most 2 "
                               "steps in a row. Used only when cache is not off."}),
                "cache_start": ("FLOAT", {
                    "default": DEFAULT_START, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "No step before this fraction of the steps is skipped (the first never is)."}),
                "cache_end": ("FLOAT", {
                    "default": DEFAULT_END, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "No step from this fraction of the steps on is skipped (the last never is)."}),
                "gpus": ("INT", {
                    "default": 1, "min": 1, "max": multi_gpu.MAX_GPUS,
                    "tooltip": "GPUs to sample on: ComfyUI's GPU plus gpus-1 worker processes on the next CUDA "
                               "GPUs, each loading the model once and kept running between runs (stopped when the "
                               "model is freed or ComfyUI exits). Progress, previews and interrupt work as with "
                               "one. Without CUDA (--cpu) this starts CPU worker processes: a test mode."}),
                "parallel": (list(multi_gpu.PARALLEL_CHOICES), {
                    "default": "auto",
                    "tooltip": "How gpus > 1 split the run. ulysses: every GPU holds 1/gpus of the video tokens "
                               "(the 48 heads must divide: 2, 3, 4, 6, 8). cfg: the two guidance branches on two "
                               "GPUs (or two groups), needs cfg > 1 and an even gpus. auto: cfg when guided and "
                               "gpus is even, then ulysses within each branch."}),
            },
        }

    def sample(self, model, positive, negative, preset, width, height, frames, steps, cfg, shift, seed,
               preview_vae=None, image_condition=None, cache="off", cache_threshold=DEFAULT_THRESHOLDS["adaptive"],
               cache_start=DEFAULT_START, cache_end=DEFAULT_END, gpus=1, parallel="auto"):
        """Return the UI summary and ``({"samples": [B, C, F, h, w]},)``.

        A NaN/Inf cfg or shift raises ValueError (a JSON NaN passes ComfyUI's min/max check);
        latents that turn NaN/Inf raise NonFiniteError naming the step: a failed execution,
        never a black video.
        """
        run = settings(preset, steps, cfg, shift)
        image = image_inputs(model, image_condition, width, height, frames)
        video = SamplingSettings(width, height, frames, seed=seed, motion_score=image.get("motion_score"), **run)
        skipping = step_cache(model.transformer, cache, cache_threshold, cache_start, cache_end, preset,
                              video.steps)
        workers = multi_gpu.runner(model, gpus, parallel, video.guided, width, height, frames)  # None for one GPU
        pos = conditioning_dict(positive, "positive")
        neg = conditioning_dict(negative, "negative") if video.guided else None
        factors = preview_factors(preview_vae)  # before planning: fitting may load the VAE onto the GPU
        kept, keeper = kept_resident_weights(model) if workers is None else (None, None)
        transformer = model.transformer

        def account_for_kept(plan, placement):  # ComfyUI accounts for what this run keeps on the GPU (may evict it)
            bridge.set_managed_size(keeper, resident_bytes(transformer, placement.blocks_on_device, model.device))
            bridge.load_models([keeper], full=True)

        progress = bridge.progress_bar(video.steps)

        def on_step(i, n, latents):
            progress.update_absolute(i, n, bridge.preview_image(preview_frame(latents, factors)))

        start = time.perf_counter()
        stats = {}
        try:
            # the handle's device memory as ComfyUI frees and reports it; the multi-GPU runner stands in for sample
            done = plan_and_sample(transformer, pos, neg, video, setup=dit_setup(model),
                                   placement=Placement(device=model.device, cuda_api=bridge.cuda_api(), kept=kept),
                                   make_room=make_room(model, kept, keeper), sampler=workers or sample,
                                   layout=workers.layout if workers else None,
                                   on_plan=account_for_kept if keeper is not None else None, on_step=on_step,
                                   should_stop=bridge.interrupt_requested, condition=image.get("condition"),
                                   cache=skipping, stats=stats)
        except SamplingInterrupted:
            bridge.check_interrupt()  # ComfyUI's own interrupt exception (weights are already home)
            raise
        finally:
            bridge.empty_cache()
        latents, plan, compiled = done.latents, done.plan, done.compiled
        seconds = time.perf_counter() - start
        mode = f"image-to-video, motion score {image['motion_score']:g}; " if image else ""
        summary = (f"{mode}{video.steps} steps, cfg {video.cfg:g}, shift {video.shift:g}, seed {seed}; "
                   f"{width}x{height}x{frames} -> latent {list(latents.shape)}; {plan['message']}"
                   f"{'' if plan.get('batch_cfg', True) else ' (CFG one branch at a time)'}; {seconds:.1f} s"
                   f"{'; ' + cache_summary(stats) if stats else ''}"
                   f"{'; ' + compiled.summary() if compiled.settings.enabled else ''}"
                   f"{'; ' + workers.description if workers else ''}")
        log.info("StepVideo sampler: %s", summary)
        return {"ui": {"text": [summary]}, "result": ({"samples": to_comfy_latent(latents)},)}


NODE_CLASS_MAPPINGS = {"StepVideoSampler": StepVideoSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"StepVideoSampler": "StepVideo Sampler"}
