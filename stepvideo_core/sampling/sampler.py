"""The Step-Video denoising loop (flow matching, Euler, classifier-free guidance), T2V and TI2V.

What the official ``StepVideoPipeline.__call__`` does, step for step, minus the
remote servers: the conditioning and the attention mask are cast to the
transformer's compute dtype, the latents are cast to it for every model call,
the timestep is cast to the latents' dtype (bf16: the model multiplies it by
1000 in bf16), the two guidance branches are combined in the model's output
dtype and the Euler step runs in fp32.

Image-to-video (a Step-Video-TI2V transformer) is the same loop with two more model
inputs, as the official TI2V pipeline passes them: the first-frame condition (the
image latent followed by zeros, from :func:`~stepvideo_core.condition.image_condition`),
given to *both* guidance branches and cast to the compute dtype like the latents, and
the motion score, a number the model rounds to the compute dtype.

It reports progress and checks for cancellation only through the callbacks it
is given (``on_step(i, n, latents)``, ``should_stop()``); it never imports ComfyUI.
Weight placement (all on the device, or block streaming) is delegated to
:class:`~stepvideo_core.offload.streamer.BlockStreamer`, which also checks
``should_stop`` between blocks.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from typing import Callable, Mapping, Optional

import torch

from ..checks import NonFiniteError, count_non_finite, finite_float
from ..dit.model import longest_context
from ..lora.apply import attachment_of
from ..offload.streamer import BlockStreamer, SamplingInterrupted
from ..parallel.dit import attach
from .cache import CacheRun, StepCache
from .noise import initial_noise, latent_shape
from .schedule import DEFAULT_MOTION_SCORE, euler_step, flow_match_sigmas, guidance
from .settings import Placement, SamplingSettings

log = logging.getLogger("StepVideo")

CONDITIONING_KEYS = ("encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")
StepCallback = Callable[[int, int, torch.Tensor], None]


def _check_conditioning(cond: Mapping, name: str) -> None:
    """Raise unless ``cond`` has the tensors the DiT takes, with consistent batch sizes and finite values.

    ValueError for a wrong structure; :class:`NonFiniteError` naming the tensor when one holds
    NaN/Inf (checked once, before the first step: such conditioning can only give a black video).
    """
    if not isinstance(cond, Mapping) or "encoder_hidden_states" not in cond:
        raise ValueError(f"{name} conditioning must be a dict with keys {list(CONDITIONING_KEYS)} "
                         f"(a STEPVIDEO_CONDITIONING from StepVideoTextEncode), got {type(cond).__name__}")
    states = cond["encoder_hidden_states"]
    if states.ndim != 3:
        raise ValueError(f"{name} encoder_hidden_states must be [B, tokens, width], got {list(states.shape)}")
    for key in CONDITIONING_KEYS[1:]:
        value = cond.get(key)
        if value is not None and value.shape[0] != states.shape[0]:
            raise ValueError(f"{name} {key} has batch {value.shape[0]}, encoder_hidden_states has {states.shape[0]}")
    for key in CONDITIONING_KEYS:
        value = cond.get(key)
        bad = 0 if value is None else count_non_finite(value)
        if bad:
            raise NonFiniteError(
                f"{name} conditioning {key} holds {bad} NaN/Inf value{'s' if bad > 1 else ''} (of {value.numel()}): "
                f"the text encoder overflowed or the conditioning was damaged on its way here. Encode the prompt "
                f"again with the text encoder in bf16 (the release's dtype), not fp16.")


def _likely_causes(model: torch.nn.Module) -> str:
    """What usually makes the latents non-finite, with what this run uses marked, for :class:`NonFiniteError`."""
    fp16 = model.compute_dtype == torch.float16
    fp8 = getattr(model, "weight_format", "full") == "fp8_scaled"
    lora = attachment_of(model) is not None
    mark = lambda applies: " [this run]" if applies else ""  # noqa: E731
    return ("Likely causes: fp16 overflow" + mark(fp16) + " (compute in bf16 instead); a bad LoRA/adapter"
            + mark(lora) + " (run without it, or lower its strength); an fp8 file with bad scales" + mark(fp8)
            + " (use the bf16 weights, or convert them again); conditioning from a text encoder that overflowed "
              "(encode the prompt again in bf16).")


def _prepared(cond: Mapping, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The three DiT inputs of ``cond`` in the compute dtype on ``device``, repeated to ``batch`` rows.

    The mask is cast to the compute dtype as the official pipeline does (the model
    sums it in the dtype it is given, reference §2.5).
    """
    out = {}
    for key in CONDITIONING_KEYS:
        value = cond.get(key)
        if value is None:
            out[key] = None
            continue
        if value.shape[0] != batch:
            if value.shape[0] != 1:
                raise ValueError(f"conditioning {key} has batch {value.shape[0]}, cannot match batch {batch}")
            value = value.expand(batch, *value.shape[1:])
        out[key] = value.to(device=device, dtype=dtype)
    return out


def model_is_ti2v(model: torch.nn.Module) -> bool:
    """True when ``model`` is a Step-Video-TI2V transformer (its config says so; models without one are T2V)."""
    return bool(getattr(getattr(model, "config", None), "is_ti2v", False))


def check_image_inputs(model: torch.nn.Module, condition: Optional[torch.Tensor], motion_score,
                       shape: tuple) -> Optional[float]:
    """The motion score to sample with (None for T2V), after checking the image inputs against ``model``.

    Exists so that a run that cannot be what the user meant fails before the first step with a
    message saying why: a condition (or a motion score) given to a Step-Video-T2V transformer, no
    condition for a Step-Video-TI2V one, a condition whose shape is not the latents' ``shape``
    [B, F, C, h, w] (batch 1 is repeated to B), or one holding NaN/Inf (:class:`NonFiniteError`).
    A TI2V run without ``motion_score`` uses :data:`~stepvideo_core.sampling.schedule.DEFAULT_MOTION_SCORE`.
    """
    if not model_is_ti2v(model):
        given = [name for name, value in (("an image condition", condition), ("a motion_score", motion_score))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'were' if len(given) > 1 else 'was'} given, but the transformer "
                             f"is Step-Video-T2V (text-to-video): "
                             f"image-to-video needs a Step-Video-TI2V transformer (stepvideo-ti2v/transformer)")
        return None
    if condition is None:
        raise ValueError("the transformer is Step-Video-TI2V (image-to-video): it needs the first-frame condition "
                         f"[1, {shape[1]}, {shape[2]}, {shape[3]}, {shape[4]}] from "
                         "stepvideo_core.image_condition(vae, image, width=, height=, frames=)")
    if not isinstance(condition, torch.Tensor):
        raise ValueError(f"the image condition must be a tensor [1, F, C, h, w], got {type(condition).__name__}")
    if condition.ndim != 5 or tuple(condition.shape[1:]) != tuple(shape[1:]) or condition.shape[0] not in (1, shape[0]):
        raise ValueError(f"the image condition must match the latents: expected [1 or {shape[0]}, "
                         f"{', '.join(map(str, shape[1:]))}] for this size, got {list(condition.shape)} (encode the "
                         f"image with image_condition at the same width, height and frames)")
    bad = count_non_finite(condition)
    if bad:
        raise NonFiniteError(f"the image condition holds {bad} NaN/Inf value{'s' if bad > 1 else ''} (of "
                             f"{condition.numel()}): the VAE encode overflowed (encode in bf16 or fp32, not fp16) "
                             f"or the latent was damaged on its way here")
    return DEFAULT_MOTION_SCORE if motion_score is None else finite_float(motion_score, "motion_score")


def _add_context_lengths(model: torch.nn.Module, dtype: torch.dtype, calls: list) -> None:
    """Give each call's inputs the longest valid text length of its mask(s), counted here on the host.

    ``calls``: (inputs dict or None, the conditioning dicts it was made from).  Exists so that the
    DiT does not read ``lengths.max()`` back from the GPU at every call (a host sync per step): the
    masks as given (usually on the CPU) are counted once per run, in the compute dtype the model
    sums them in.  Only models whose ``forward`` names ``context_length`` get it.
    """
    if "context_length" not in inspect.signature(model.forward).parameters:
        return
    for inputs, sources in calls:
        if inputs is None:
            continue
        masks = [c.get("encoder_attention_mask") for c in sources]
        if any(m is None for m in masks):
            continue
        inputs["context_length"] = max(longest_context(m.to(dtype)) for m in masks)


def _concat(a: dict, b: dict) -> Optional[dict]:
    """[a; b] along the batch axis, or None when the two cannot share one call (different lengths)."""
    out = {}
    for key in CONDITIONING_KEYS:
        if (a[key] is None) != (b[key] is None):
            return None
        if a[key] is None:
            out[key] = None
        elif a[key].shape[1:] != b[key].shape[1:]:
            return None
        else:
            out[key] = torch.cat([a[key], b[key]])
    return out


def sample(model: torch.nn.Module, positive: Mapping, negative: Optional[Mapping] = None, *,
           settings: SamplingSettings, placement: Placement = Placement(), noise: Optional[torch.Tensor] = None,
           condition: Optional[torch.Tensor] = None, on_step: Optional[StepCallback] = None,
           should_stop: Optional[Callable[[], bool]] = None, cache: Optional[StepCache] = None,
           stats: Optional[dict] = None) -> torch.Tensor:
    """Generate latents: returns fp32 ``[B, frames/17*3, 64, height/16, width/16]`` on the CPU.

    * ``positive`` / ``negative``: dicts with ``encoder_hidden_states`` [B, S, 6144],
      ``encoder_hidden_states_2`` [B, 77, 1024] and ``encoder_attention_mask`` [B, 77+S].
      Guidance runs when ``settings.cfg > 1`` (as the official pipeline); it then needs ``negative``.
    * ``settings``: what the run makes (:class:`~stepvideo_core.sampling.settings.SamplingSettings`:
      size, steps, cfg, shift, seed, motion score); ``seed`` draws bf16 noise on the CPU (same video on
      every machine); ``noise`` replaces it when given.
    * ``placement``: where and how it computes (:class:`~stepvideo_core.sampling.settings.Placement`:
      device, blocks kept there, batched CFG, the streamer's mode and CUDA calls, kept weights, the
      parallel context); the default computes where the weights are, every block resident, CFG batched.
    * ``on_step(i, n, latents)`` after each step, i = completed steps (1..n), latents fp32
      [B, F, C, h, w]; ``should_stop()`` is polled before every step and every block, and
      a True answer raises :class:`SamplingInterrupted` after every weight is back home.

    * ``condition`` / ``settings.motion_score`` (Step-Video-TI2V only, required / default 5): the
      first-frame condition ``[1, F, 64, h, w]`` from :func:`~stepvideo_core.condition.image_condition`
      at this size, repeated to every row of every model call (both guidance branches see the
      image, as officially) and cast to the compute dtype; the motion score is passed to every
      call (the model rounds it to the compute dtype).

    * ``cache``: a :class:`~stepvideo_core.sampling.cache.StepCache` (default off: bit-identical to
      no cache); a skipped step makes no DiT call (both CFG branches skip together) and reuses the
      last velocity; ``on_step``, ``should_stop`` and the non-finite check run on every step.  A
      calibrated cache must carry its calibration (:meth:`StepCache.resolved`).
    * ``stats``: a dict filled in as the run goes (also when interrupted): ``dit_calls`` (DiT calls
      made), ``skipped_calls``, ``skipped_steps`` (1-based), ``cache`` (the settings in words),
      ``steps``, and ``ratios`` when the cache records them;
      :func:`~stepvideo_core.sampling.cache.summary` puts it in words.

    * ``placement.parallel``: this process is one rank of a parallel run (Ulysses sequence parallel
      and/or CFG parallel, :func:`stepvideo_core.parallel.attach`).  Every rank calls with the same
      settings and gets the same latents; ``should_stop`` is then polled only before each step, and the
      ranks agree (any rank's stop stops all at the same step), since a rank leaving between blocks
      would leave the others waiting in a collective.

    Raises ValueError for a NaN/Inf ``cfg``, ``shift`` or ``motion_score``, for image inputs that do
    not fit the transformer (see :func:`check_image_inputs`), and :class:`NonFiniteError` when the
    conditioning or the image condition holds NaN/Inf or the latents turn non-finite after a step
    (naming the step).
    """
    width, height, frames, steps, seed = (settings.width, settings.height, settings.frames, settings.steps,
                                          settings.seed)
    cfg, shift = settings.cfg, settings.shift
    parallel, batch_cfg = placement.parallel, placement.batch_cfg
    cfg, shift = finite_float(cfg, "cfg"), finite_float(shift, "shift")
    _check_conditioning(positive, "positive")
    guided = cfg > 1.0
    if guided:
        if negative is None:
            raise ValueError(f"cfg {cfg} > 1 needs negative conditioning (or set cfg to 1 to sample without guidance)")
        _check_conditioning(negative, "negative")
    should_stop = should_stop or (lambda: False)
    dtype = model.compute_dtype
    device = torch.device(placement.device) if placement.device is not None else next(model.parameters()).device
    batch = positive["encoder_hidden_states"].shape[0]
    shape = latent_shape(width, height, frames, batch, model.config.in_channels)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {list(shape)} for {width}x{height}x{frames}, got {list(noise.shape)}")
    motion_score = check_image_inputs(model, condition, settings.motion_score, shape)

    sigmas = flow_match_sigmas(steps, shift, device=device)
    latents = (noise if noise is not None else initial_noise(shape, seed)).to(device)
    pos = _prepared(positive, batch, dtype, device)
    neg = _prepared(negative, batch, dtype, device) if guided else None
    both = _concat(pos, neg) if guided and batch_cfg else None
    _add_context_lengths(model, dtype, [(pos, [positive]), (neg, [negative]), (both, [positive, negative])])
    image = {}  # the TI2V condition for the one call batch this run uses, in the compute dtype
    if condition is not None:
        rows = condition.to(device=device, dtype=dtype).expand(batch, *shape[1:])
        # batched CFG: [cond; uncond] rows both see the image, as the official .repeat(2) does
        image = {2 * batch: torch.cat([rows, rows])} if both is not None else {batch: rows.contiguous()}
        del rows
    calls_per_step = 2 if guided and both is None else 1
    streamer_stop, sharding = should_stop, nullcontext()
    if parallel is not None:
        if parallel.layout.cfg > 1 and not (guided and both is not None):
            raise ValueError("CFG parallel computes the two branches of the batched [cond; uncond] call on two ranks: "
                             "it needs guidance (cfg > 1) with batched CFG")
        local_stop, streamer_stop, sharding = should_stop, None, attach(model, parallel)
        should_stop = lambda: parallel.agree_to_stop(local_stop())  # noqa: E731 - every rank, every step
    run = CacheRun(cache if cache is not None else StepCache(), steps, calls_per_step, stats, model)

    def velocity(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = sigma.expand(x.shape[0]).to(x.dtype)
        if motion_score is None:
            return model(hidden_states=x, timestep=timestep, **cond)
        return model(hidden_states=x, timestep=timestep, **cond, condition_hidden_states=image[x.shape[0]],
                     motion_score=motion_score)

    with torch.inference_mode(), sharding, BlockStreamer(model, device, placement.blocks_on_device,
                                                         should_stop=streamer_stop, mode=placement.streamer_mode,
                                                         cuda_api=placement.cuda_api, kept=placement.kept):
        for i in range(steps):
            if should_stop():
                raise SamplingInterrupted(f"interrupted before step {i + 1}/{steps}")
            v = run.reuse(i, latents)  # None: call the DiT (a skipped step calls nothing, streams nothing)
            if v is None:
                x = latents.to(dtype)
                sigma = sigmas[i]
                if not guided:
                    v = velocity(x, sigma, pos)
                elif both is not None:
                    v_cond, v_uncond = velocity(torch.cat([x, x]), sigma, both).chunk(2)
                    v = guidance(v_cond, v_uncond, cfg)
                else:
                    v = guidance(velocity(x, sigma, pos), velocity(x, sigma, neg), cfg)
                run.computed(i, latents, v, calls_per_step)
            latents = euler_step(latents, v, sigmas, i)
            if not bool(torch.isfinite(latents).all()):  # one reduction per step
                bad = count_non_finite(latents)
                raise NonFiniteError(f"the latents became non-finite (NaN/Inf) at step {i + 1}/{steps} "
                                     f"({bad} of {latents.numel()} values); stopped instead of decoding a black "
                                     f"video. {_likely_causes(model)}")
            if on_step is not None:
                on_step(i + 1, steps, latents)
    return latents.float().cpu()
