"""Step-Video as a ComfyUI model family: latent format, model config, BaseModel, diffusion model, patcher.

Imported only inside ComfyUI (it imports ``comfy`` at the top; :mod:`.native` imports it lazily).
Nothing here patches ComfyUI: the classes subclass ComfyUI's public building blocks, the way
``comfy/model_base.py`` and ``comfy/supported_models.py`` define a family, and the pack constructs
the ModelPatcher itself instead of going through ComfyUI's checkpoint detection.

Conventions (see the README's design notes):

* **Sigma.** The official schedule runs sigma_off from 0 (noise) to 1 (data) and the DiT predicts
  ``v = dx/dsigma_off = x0 - noise``.  ComfyUI's FLOW family (``CONST``) runs sigma_c from 1
  (noise) to 0 (data) with ``x = sigma_c*noise + (1 - sigma_c)*x0`` and ``denoised = x - out*sigma_c``,
  so it wants ``out = noise - x0 = -v``.  :class:`StepVideoDiffusionModel` receives sigma_c (the
  BaseModel divides ComfyUI's timestep by the sampling multiplier, so ``ModelSamplingSD3``'s 1000
  works too), gives the DiT ``1 - sigma_c`` (exactly the official arithmetic for the official
  schedule) and returns ``-v``.
* **Layout.** ComfyUI's video latents are ``[B, C, F, h, w]``; the DiT's are ``[B, F, C, h, w]``.
  The diffusion model converts inside its wrapped forward, so DIFFUSION_MODEL wrappers (EasyCache)
  see ComfyUI's layout with ``latent_channels`` = 64 channels.
* **Weights.** The diffusion model *is* the pack's :class:`StepVideoTransformer` (a subclass adding
  the ComfyUI forward), so ``model.state_dict()`` has the checkpoint's names under
  ``diffusion_model.``.  Its layers are ComfyUI-castable (``comfy.ops`` ``CastWeightBiasOp``), so
  ComfyUI's partial loading ("lowvram": weights cast to the GPU per layer on use) runs the 30B model
  on small GPUs; scaled fp8 block weights keep the pack's format and matmul.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils

from ..stepvideo_core import fp8
from ..stepvideo_core import ops as core_ops
from ..stepvideo_core.dit.config import StepVideoDiTConfig
from ..stepvideo_core.dit.loader import detect_weight_format, find_transformer_files, resolve_weight_format
from ..stepvideo_core.dit.loader import load_transformer
from ..stepvideo_core.dit.model import StepVideoTransformer
from ..stepvideo_core.dtypes import DTYPE_NAMES
from ..stepvideo_core.layers import RMSNorm, rms_norm
from ..stepvideo_core.offload.planner import PEAK_UNITS, PlanInputs, host_activation_bytes, planned_format
from ..stepvideo_core.vae.config import FRAME_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR

LATENT_CHANNELS = 64
DEFAULT_SHIFT = 13.0
# Keys of the CONDITIONING dict (beside the Step-LLM states in the tensor slot).
CLIP_KEY = "stepvideo_clip_states"      # HunyuanCLIP states [B, 77, 1024]
MASK_KEY = "attention_mask"             # cross-attention mask [B, 77 + 320]: 77 CLIP ones, then the LLM mask
IMAGE_KEY = "stepvideo_image_condition"  # TI2V: first-frame condition [1, C, F, h, w] (ComfyUI layout)
MOTION_KEY = "stepvideo_motion_score"    # TI2V: the motion score (a float)
# Model-cond names, i.e. the diffusion model's keyword arguments.
CLIP_COND = "encoder_hidden_states_2"
MASK_COND = "encoder_attention_mask"
MOTION_COND = "motion_score"
# ComfyUI's flash-attention memory formula is  area * dtype_size * 0.01 * factor  MiB with area = B * F*h*w
# tokens; the planner counts PEAK_UNITS copies of the hidden states (B * L * D * dtype_size bytes) at a
# block's peak, so the two agree when factor = PEAK_UNITS * D / (0.01 * 2**20).
_MIB_PER_PERCENT = 0.01 * (1 << 20)


# --------------------------------------------------------------------------- latent format


class StepVideoLatentFormat(comfy.latent_formats.LatentFormat):
    """Video-VAE v2 latents: 64 channels, 16x spatial compression, 17 frames -> 3 latent frames.

    ``temporal_downscale_ratio`` is 17/3: the VAE has no integer frame ratio (each 17-frame chunk
    becomes 3 latent frames), and what ComfyUI does with the ratio -- rescale an empty latent that was
    sized with another model's ratio (``comfy.sample.fix_empty_latent_channels``) -- gives exactly
    ``frames / 17 * 3`` latent frames with 17/3 and a wrong count with any integer.  No scaling
    (the official VAE uses none).  No ``latent_rgb_factors`` and no TAESD decoder: the pack ships no
    latent->RGB map (only a fit for the user's VAE means anything, and a latent format has none), so
    ComfyUI's samplers show progress without preview images whatever the preview method.
    """

    latent_channels = LATENT_CHANNELS
    latent_dimensions = 3
    spacial_downscale_ratio = SPATIAL_FACTOR
    temporal_downscale_ratio = FRAME_CHUNK / LATENTS_PER_CHUNK
    scale_factor = 1.0

    def __init__(self, channels: int = LATENT_CHANNELS):
        self.latent_channels = int(channels)  # 64 for the release; the tiny test models have fewer


# --------------------------------------------------------------------------- model config


class StepVideoT2VConfig(comfy.supported_models_base.BASE):
    """The model config (what ``comfy/supported_models.py`` holds per family) for a Step-Video-T2V DiT.

    Not registered for checkpoint detection (a pack cannot add to ``supported_models.models``):
    :func:`build_base_model` constructs it from the loaded DiT's config.
    """

    unet_config = {"image_model": "stepvideo_t2v"}
    unet_extra_config = {}
    sampling_settings = {"shift": DEFAULT_SHIFT, "multiplier": 1.0}
    latent_format = StepVideoLatentFormat
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = PEAK_UNITS[2] * 6144 / _MIB_PER_PERCENT  # the released width; see __init__

    def __init__(self, dit_config: StepVideoDiTConfig, weight_format: str = "full", attention: str = "sdpa"):
        super().__init__({"image_model": "stepvideo_t2v", "disable_unet_model_creation": True,
                          **dit_config.to_dict()})
        self.dit_config = dit_config
        self.latent_format = StepVideoLatentFormat(dit_config.in_channels)
        self.weight_format = weight_format
        self.attention = attention
        self.memory_usage_factor = PEAK_UNITS[2] * dit_config.inner_dim / _MIB_PER_PERCENT

    def get_model(self, state_dict, prefix="", device=None):
        raise NotImplementedError("StepVideo models are built by the pack's loader (StepVideoNativeModelLoader), "
                                  "not from ComfyUI's checkpoint detection")


# --------------------------------------------------------------------------- ComfyUI-castable layers


def _every_op() -> None:
    """What ComfyUI's own ops do first in every forward (the interrupt check), where this ComfyUI has it."""
    hook = getattr(comfy.ops, "run_every_op", None)
    if hook is not None:
        hook()


@contextmanager
def _cast(layer, x: torch.Tensor, **kwargs):
    """(weight, bias) of ``layer`` on ``x``'s device (in ``x``'s dtype unless ``dtype=`` says otherwise),
    through ComfyUI's cast machinery (offload streams, LoRA weight functions of partially loaded layers)."""
    context = getattr(comfy.ops, "CastBiasWeightContext", None)
    if context is not None:
        with context(layer, x, offloadable=True, **kwargs) as (weight, bias):
            yield weight, bias
    else:  # older ComfyUI: a plain (weight, bias) pair
        yield comfy.ops.cast_bias_weight(layer, x, **kwargs)


def _needs_cast(layer) -> bool:
    return bool(layer.comfy_cast_weights or layer.weight_function or layer.bias_function)


class NativeLinear(core_ops.Linear, comfy.ops.CastWeightBiasOp):
    """The pack's Linear (``F.linear``, no init) that ComfyUI can leave in RAM and cast per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _every_op()
        if _needs_cast(self):
            with _cast(self, x) as (weight, bias):
                return F.linear(x, weight, bias)
        return super().forward(x)


class NativeFp8Linear(fp8.ScaledFp8Linear, comfy.ops.CastWeightBiasOp):
    """:class:`~stepvideo_core.fp8.ScaledFp8Linear` (fp8 weight + per-channel scale) for ComfyUI.

    Resident: the pack's own fp8 forward.  Partially loaded (``comfy_cast_weights``): the fp8 weight
    and its scales are copied to the compute device for the call and multiplied there with the same
    arithmetic; LoRA weight functions see the dequantised weight.  ``convert_weight`` /
    ``set_weight`` are the hooks ComfyUI's ModelPatcher calls to patch a weight (LoRA at load): the
    patch is applied to the dequantised weight and stored back in fp8 with the layer's existing
    scales, so unpatching (which restores ``weight`` only) gives back the exact original.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _every_op()
        if not _needs_cast(self):
            return super().forward(x)
        if not self.is_fp8:
            with _cast(self, x) as (weight, bias):
                return F.linear(x, weight, bias)
        device = x.device
        non_blocking = comfy.model_management.device_supports_non_blocking(device)
        scale = comfy.model_management.cast_to(self.scale_weight, None, device, non_blocking=non_blocking)
        if not (self.weight_function or self.bias_function):  # the fp8 weight itself crosses (half the bytes)
            with _cast(self, x, dtype=self.weight.dtype, bias_dtype=x.dtype) as (weight, bias):
                return self.fp8_linear(x, weight, scale, bias)
        weight = comfy.model_management.cast_to(self.weight, None, device, non_blocking=non_blocking)
        bias = None
        if self.bias is not None:
            bias = comfy.model_management.cast_to(self.bias, x.dtype, device, non_blocking=non_blocking,
                                                  copy=bool(self.bias_function))
            for function in self.bias_function:
                bias = function(bias)
        full = fp8.dequantize_weight(weight, scale, x.dtype)  # weight functions (LoRA) see the real weight
        for function in self.weight_function:
            full = function(full)
        return F.linear(x, full, bias)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """A float copy of the stored weight -> the weight it stands for (fp8 values times their scales)."""
        if not self.is_fp8:
            return weight
        scale = self.scale_weight.to(device=weight.device, dtype=weight.dtype).reshape(-1, 1)
        return weight.mul_(scale) if inplace else weight * scale

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        """Store a patched full-precision ``weight`` (fp8 layers: re-quantised with the existing scales)."""
        if self.is_fp8:
            scale = self.scale_weight.to(device=weight.device, dtype=torch.float32).reshape(-1, 1)
            stored = (weight.float() / scale).clamp_(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
        else:
            stored = weight.to(self.weight.dtype)
        if return_weight:
            return stored
        if inplace_update:
            self.weight.data.copy_(stored)
        else:
            self.weight = torch.nn.Parameter(stored, requires_grad=False)
        return None


class NativeRMSNorm(RMSNorm, comfy.ops.CastWeightBiasOp):
    """StepFun's RMS norm (fp32 statistics) whose weight ComfyUI can leave in RAM and cast per call."""

    bias = None  # what ComfyUI's cast reads beside the weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _every_op()
        if _needs_cast(self):
            with _cast(self, x) as (weight, _):
                return rms_norm(x, weight, self.eps)
        return super().forward(x)


class native_ops(core_ops.plain):  # noqa: N801 - an op family, named like comfy.ops' and the pack's
    """The pack's layer family with ComfyUI-castable layers (what ComfyUI's partial loading needs)."""

    Linear = NativeLinear
    Conv2d = comfy.ops.disable_weight_init.Conv2d
    Conv3d = comfy.ops.disable_weight_init.Conv3d
    LayerNorm = comfy.ops.disable_weight_init.LayerNorm
    GroupNorm = comfy.ops.disable_weight_init.GroupNorm
    RMSNorm = NativeRMSNorm


class native_fp8_ops(native_ops):  # noqa: N801
    """:class:`native_ops` whose Linear layers can hold the pack's scaled fp8 weights."""

    Linear = NativeFp8Linear


def castable_problems(model: torch.nn.Module) -> list[str]:
    """Names of the modules holding weights that ComfyUI's partial loading could not handle.

    A leaf module with parameters must be castable (``comfy_cast_weights``), or it may be left in RAM
    while the input is on the GPU.  Modules with children *and* parameters of their own (the
    modulation tables) are never moved by partial loading; the DiT moves those tensors to the
    activations' device itself.
    """
    bad = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        has_children = any(True for _ in module.children())
        if own and not has_children and not hasattr(module, "comfy_cast_weights"):
            bad.append(name)
    return bad


# --------------------------------------------------------------------------- the diffusion model


class StepVideoDiffusionModel(StepVideoTransformer):
    """The pack's DiT with ComfyUI's calling convention (``BaseModel.diffusion_model``).

    ``forward(x [B, C, F, h, w], timestep = sigma_c [B], context = Step-LLM states [B, S, D_llm],
    encoder_hidden_states_2 = CLIP states, encoder_attention_mask, transformer_options)`` -> ``-v``
    in ComfyUI's layout.  The call runs through ComfyUI's DIFFUSION_MODEL wrappers (EasyCache);
    inside, blocks honour ``patches_replace["dit"][("double_block", i)]`` and set
    ``transformer_options["block_index"]`` / ``["total_blocks"]``.  The attention choice is the
    transformer's ``attention_backend`` (set by the loader).
    """

    _native_options: Optional[dict] = None

    @property
    def dtype(self) -> torch.dtype:
        """What ComfyUI casts the latents to before calling (BaseModel.get_dtype): the compute dtype."""
        return self.compute_dtype

    def forward(self, x, timestep, context=None, encoder_hidden_states_2=None, encoder_attention_mask=None,
                control=None, transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers)
        return executor.execute(x, timestep, context, encoder_hidden_states_2, encoder_attention_mask,
                                transformer_options, **kwargs)

    def _forward(self, x, timestep, context, encoder_hidden_states_2=None, encoder_attention_mask=None,
                 transformer_options=None, **kwargs):
        if not self.is_ti2v and kwargs.get(MOTION_COND) is not None:
            raise ValueError("StepVideo: the conditioning carries an image (StepVideo Native Image to Video) but the "
                             "model is Step-Video-T2V; load a Step-Video-TI2V transformer")
        if x.ndim != 5 or x.shape[1] not in (self.config.in_channels, self.config.patch_in_channels):
            raise ValueError(f"StepVideo: the latent must be a Step-Video latent [B, {self.config.in_channels}, F, "
                             f"h, w] (StepVideo Empty Latent or StepVideo VAE Encode), got shape {list(x.shape)}")
        if context is None or context.shape[-1] != self.config.caption_dim:
            got = "none" if context is None else f"width {context.shape[-1]}"
            raise ValueError(f"StepVideo: the positive/negative conditioning must come from StepVideo Native Text "
                             f"Encode (Step-LLM states of width {self.config.caption_dim}), got {got}")
        dtype = self.compute_dtype
        sigma = 1 - timestep.float()  # sigma_c -> the official sigma (0 = noise); exact for the official schedule
        mask = None if encoder_attention_mask is None else encoder_attention_mask.to(device=x.device, dtype=dtype)
        latents, image = self._split_image_condition(x, kwargs.get(MOTION_COND))
        self._native_options = {} if transformer_options is None else transformer_options
        try:
            velocity = StepVideoTransformer.forward(self, latents.movedim(1, 2), sigma.to(dtype), context,
                                                    encoder_hidden_states_2, mask, **image)
        finally:
            self._native_options = None
        return velocity.neg_().movedim(2, 1)

    def _split_image_condition(self, x: torch.Tensor, motion_score) -> tuple[torch.Tensor, dict]:
        """(latents, TI2V keyword arguments) of the model input.

        ComfyUI concatenates the image condition (``c_concat``) to the latents on the channel axis
        before calling -- what the official TI2V ``patchfy`` does first -- so a TI2V call arrives with
        2 x 64 channels and is split back into the latents and ``condition_hidden_states``.
        """
        channels = self.config.in_channels
        if not self.is_ti2v:  # (an image for a T2V model was refused in _forward)
            return x, {}
        if x.shape[1] != 2 * channels or motion_score is None:
            raise ValueError("StepVideo: the model is Step-Video-TI2V (image-to-video): put StepVideo Native Image "
                             "to Video between the text encoders and the sampler (it adds the first frame and the "
                             "motion score to the positive and negative conditioning)")
        return x[:, :channels], {"condition_hidden_states": x[:, channels:].movedim(1, 2),
                                 "motion_score": float(motion_score)}

    def run_blocks(self, holder: list, context: torch.Tensor, t6: torch.Tensor, rope: tuple,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
        options = self._native_options
        if options is None:  # called as the pack's own model (no ComfyUI options): the core loop
            return super().run_blocks(holder, context, t6, rope, mask)
        replace = options.get("patches_replace", {}).get("dit", {})
        options["total_blocks"] = len(self.transformer_blocks)
        options["block_type"] = "double"
        x = holder.pop()
        backend = self.resolved_attention(x.device, x.dtype)  # resolved once per device and dtype
        for i, block in enumerate(self.transformer_blocks):
            options["block_index"] = i
            patch = replace.get(("double_block", i))
            if patch is None:
                x = block(x, context, t6, rope, mask, backend)
                continue

            def original(args, block=block):
                return {"img": block(args["img"], args["txt"], args["vec"], args["pe"], mask, backend)}

            x = patch({"img": x, "txt": context, "vec": t6, "pe": rope, "transformer_options": options},
                      {"original_block": original})["img"]
        return x


# --------------------------------------------------------------------------- the BaseModel


class StepVideoBaseModel(comfy.model_base.BaseModel):
    """ComfyUI's model object for Step-Video-T2V: FLOW (``CONST``) sampling, shift 13, multiplier 1.

    Conditioning (from :func:`native_conditioning`): the Step-LLM states are the CONDITIONING tensor
    (``c_crossattn``, :class:`comfy.conds.CONDCrossAttn`); the CLIP states and the cross-attention
    mask travel in the dict and become :class:`comfy.conds.CONDRegular` model conds, so they are
    batched with their prompt, repeated to the latent batch, and a cond/uncond pair is only
    concatenated into one call when their shapes agree (the mask's length pins the token count).
    """

    def __init__(self, model_config: StepVideoT2VConfig, diffusion_model: StepVideoDiffusionModel, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = diffusion_model
        comfy.model_management.archive_model_dtypes(self.diffusion_model)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        clip = kwargs.get(CLIP_KEY)
        if clip is not None:
            out[CLIP_COND] = comfy.conds.CONDRegular(clip)
        mask = kwargs.get(MASK_KEY)
        if mask is not None:
            out[MASK_COND] = comfy.conds.CONDRegular(mask)
        motion = kwargs.get(MOTION_KEY)
        if motion is not None:  # one number for the whole batch: cond and uncond still share a call
            out[MOTION_COND] = comfy.conds.CONDConstant(float(motion))
        return out

    def concat_cond(self, **kwargs):
        """The TI2V first-frame condition, repeated to the batch: ComfyUI concatenates it to the latents on the
        channel axis (``c_concat``) before every call, as the official patch embed's input is built."""
        image = kwargs.get(IMAGE_KEY)
        if image is None:
            return None
        noise = kwargs.get("noise")
        if noise is not None and tuple(image.shape[1:]) != tuple(noise.shape[1:]):
            raise ValueError(f"StepVideo: the image condition is {list(image.shape[1:])} but the latent is "
                             f"{list(noise.shape[1:])}: StepVideo Native Image to Video and the latent must have the "
                             f"same width, height and frames (use its latent output)")
        batch = noise.shape[0] if noise is not None else image.shape[0]
        return comfy.utils.resize_to_batch_size(image, batch).to(kwargs.get("device", image.device))

    def process_timestep(self, timestep, **kwargs):
        """ComfyUI's model timestep is ``sigma * multiplier``; the diffusion model takes sigma_c itself.

        The family's multiplier is 1 (nothing to undo); ``ModelSamplingSD3`` patches in 1000.
        """
        multiplier = float(getattr(self.model_sampling, "multiplier", 1.0))
        return timestep if multiplier == 1.0 else timestep / multiplier

    def resize_cond_for_context_window(self, cond_key, cond_value, window, x_in, device, retain_index_list=[]):  # noqa: B006
        """The text conds have no frame axis: every context window gets them whole."""
        if cond_key in ("c_crossattn", CLIP_COND, MASK_COND) and isinstance(getattr(cond_value, "cond", None),
                                                                             torch.Tensor):
            return cond_value._copy_with(cond_value.cond.to(device))
        return super().resize_cond_for_context_window(cond_key, cond_value, window, x_in, device,
                                                      retain_index_list=retain_index_list)

    def memory_required(self, input_shape, cond_shapes={}):  # noqa: B006
        """Bytes of activations one call of this batch needs: the pack's planner (the same model as
        StepVideoSampler's plan), for a latent ``[B, C, F, h, w]``.  The planner counts whole
        17-frame chunks, so a frame count that is not a multiple of 3 is rounded up."""
        shape = list(input_shape)
        batch = int(shape[0])
        frames, h, w = (shape[2], shape[3], shape[4]) if len(shape) == 5 else (1, shape[-2], shape[-1])
        chunks = max(1, -(-int(frames) // LATENTS_PER_CHUNK))
        cfg = self.model_config
        compute = DTYPE_NAMES.get(self.diffusion_model.compute_dtype, "bf16")
        weight_format = planned_format(cfg.weight_format, compute)
        run = PlanInputs(int(w) * SPATIAL_FACTOR, int(h) * SPATIAL_FACTOR, chunks * FRAME_CHUNK, cfg_batch=batch,
                         weight_format=weight_format, attention=self.diffusion_model.attention_backend,
                         compute_dtype=compute, config=cfg.dit_config.to_dict())
        return host_activation_bytes(run)


# --------------------------------------------------------------------------- construction


def build_base_model(diffusion_model: StepVideoDiffusionModel) -> StepVideoBaseModel:
    """The BaseModel around a loaded :class:`StepVideoDiffusionModel` (weights wherever they are)."""
    if not isinstance(diffusion_model, StepVideoDiffusionModel):
        raise TypeError(f"expected a StepVideoDiffusionModel, got {type(diffusion_model).__name__}")
    config = StepVideoT2VConfig(diffusion_model.config, getattr(diffusion_model, "weight_format", "full"),
                                diffusion_model.attention_backend)
    return StepVideoBaseModel(config, diffusion_model)


def make_patcher(diffusion_model: StepVideoDiffusionModel, load_device=None, offload_device=None):
    """A ComfyUI ModelPatcher (the MODEL socket's value) for ``diffusion_model``.

    Devices default to ComfyUI's (``get_torch_device`` / ``unet_offload_device``), so
    ``load_models_gpu``, ``free_memory`` and ``--cache-none`` manage it like any other model.  The
    plain ModelPatcher, not ComfyUI's dynamic-VRAM one: partial loading through ``comfy_cast_weights``
    is what the pack's layers implement and what the tests exercise.
    """
    model = build_base_model(diffusion_model)
    load = load_device if load_device is not None else comfy.model_management.get_torch_device()
    offload = offload_device if offload_device is not None else comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def load_diffusion_model(path, dtype: torch.dtype, weight_format: str, attention: str,
                         device=None) -> StepVideoDiffusionModel:
    """Load a Step-Video DiT checkpoint (folder or file) as a :class:`StepVideoDiffusionModel`.

    Same loader as StepVideoModelLoader (same files, fp8 quantisation, checks), with ComfyUI-castable
    layers; weights land on ``device`` (default: ComfyUI's offload device).
    """
    index, _ = find_transformer_files(path)
    use_fp8 = "fp8_scaled" in (resolve_weight_format(weight_format, index), detect_weight_format(index))
    device = device if device is not None else comfy.model_management.unet_offload_device()
    return load_transformer(path, dtype=dtype, device=device, attention=attention,
                            operations=native_fp8_ops if use_fp8 else native_ops, weight_format=weight_format,
                            model_class=StepVideoDiffusionModel)


def load_native_patcher(path, dtype: torch.dtype, weight_format: str, attention: str):
    """:func:`load_diffusion_model` + :func:`make_patcher`; the patcher can re-create itself
    (``cached_patcher_init``), which ComfyUI's MultiGPU nodes need to deep-clone it onto another GPU."""
    patcher = make_patcher(load_diffusion_model(path, dtype, weight_format, attention))
    patcher.cached_patcher_init = (load_native_patcher, (path, dtype, weight_format, attention))
    return patcher


def intermediate_device() -> torch.device:
    """Where ComfyUI keeps latents between nodes."""
    return torch.device(comfy.model_management.intermediate_device())


def is_stepvideo_patcher(model) -> bool:
    """True for a MODEL whose diffusion model is a Step-Video DiT."""
    return isinstance(getattr(getattr(model, "model", None), "diffusion_model", None), StepVideoTransformer)


# --------------------------------------------------------------------------- conditioning


def with_image_condition(conditioning: list, condition: torch.Tensor, motion_score: float) -> list:
    """``conditioning`` with the TI2V first-frame condition (official layout [1, F, C, h, w]) and motion score
    added to every entry (both guidance branches see the image, as officially); the input is not changed."""
    image = condition.movedim(1, 2).contiguous()  # -> ComfyUI's [1, C, F, h, w]
    return [[states, {**extras, IMAGE_KEY: image, MOTION_KEY: float(motion_score)}] for states, extras in conditioning]


def native_conditioning(dit_inputs: dict) -> list:
    """CONDITIONING ``[[llm_states, {clip states, mask}]]`` from the DiT's three text inputs.

    The tensors are kept as encoded (dtype, CPU); the sampler casts them to the model's dtype and
    device, and the diffusion model casts the mask to the compute dtype as the official pipeline does.
    """
    states = dit_inputs["encoder_hidden_states"]
    extras = {}
    if dit_inputs.get("encoder_hidden_states_2") is not None:
        extras[CLIP_KEY] = dit_inputs["encoder_hidden_states_2"]
    if dit_inputs.get("encoder_attention_mask") is not None:
        extras[MASK_KEY] = dit_inputs["encoder_attention_mask"]
    return [[states, extras]]
