"""Values that travel between StepVideo nodes (the pack-private socket types)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotation only: the handle type needs no VAE code
    from ..stepvideo_core.vae import StepVideoVAE

STEPVIDEO_MODEL = "STEPVIDEO_MODEL"


@dataclasses.dataclass(frozen=True)
class StepVideoModelHandle:
    """What a ``STEPVIDEO_MODEL`` socket carries: a light handle, never a copy of weights.

    `transformer` is the loaded base DiT, shared by every handle derived from this one
    (a LoRA loader returns ``dataclasses.replace(handle, adapters=...)``, not a deep copy).
    The weights rest on `offload_device`; `device` is where the sampler computes.
    `attention` is the attention backend the sampler applies at run time, so that handles
    sharing one transformer can differ in it. `weight_format` is how the block weights are
    stored ("full" in `dtype`, or "fp8_scaled"); `dtype` is then the compute dtype.
    `blocks_on_device` is the streaming choice the sampler applies: "auto" (the memory
    planner decides), "all", or a number of blocks kept on the device.
    `compile` is the sampler's ``torch.compile`` choice for the transformer blocks: "off" or "blocks"
    (:mod:`stepvideo_core.compile`; applied per run, so handles sharing one transformer can differ).
    """

    transformer: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    offload_device: torch.device
    attention: str
    source: Path
    adapters: tuple = ()
    weight_format: str = "full"
    blocks_on_device: str = "auto"
    compile: str = "off"

    @property
    def config(self):
        """Return the transformer's ``StepVideoDiTConfig``."""
        return self.transformer.config



STEPVIDEO_TEXT_ENCODER = "STEPVIDEO_TEXT_ENCODER"
STEPVIDEO_CONDITIONING = "STEPVIDEO_CONDITIONING"


@dataclasses.dataclass(frozen=True, eq=False)
class StepVideoTextEncoderHandle:
    """What a ``STEPVIDEO_TEXT_ENCODER`` socket carries: the loaded encoder, never a copy of weights.

    `encoder` is the core :class:`~stepvideo_core.text.encoder.StepVideoTextEncoder` (weights, tokenizers,
    prompt cache), shared by every handle derived from this one (``dataclasses.replace``).
    `patcher` is the ComfyUI ``ModelPatcher`` that ComfyUI's model management loads, accounts
    for and evicts (None outside ComfyUI); ComfyUI recognises a model output by this attribute,
    as it does ``comfy.sd.CLIP.patcher``. `keep_in_ram` False drops the weights from RAM and VRAM
    after each encode (the next new prompt reads them again from disk).

    Attributes it does not have are read from `encoder` (``handle.device``, ``handle.is_cached``,
    ...), so code written for the bare encoder keeps working.
    """

    encoder: object
    patcher: object = None
    keep_in_ram: bool = True

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "encoder":  # copy/pickle probe dunders before __init__ ran
            raise AttributeError(name)
        return getattr(self.encoder, name)


@dataclasses.dataclass(frozen=True, eq=False)
class StepVideoConditioning:
    """What a ``STEPVIDEO_CONDITIONING`` socket carries: exactly the DiT's text inputs, plus the prompt.

    Tensors rest on the CPU (the sampler moves them): `encoder_hidden_states` [B, 320, 6144]
    (Step-LLM, bf16 for the release), `encoder_hidden_states_2` [B, 77, 1024] (HunyuanCLIP,
    same dtype), `encoder_attention_mask` [B, 397] int64 (77 ones, then the Step-LLM mask).
    `prompt` is the text as encoded (with the magic suffix when added); `notes` are the
    warnings shown on the node (e.g. truncation).
    """

    encoder_hidden_states: torch.Tensor
    encoder_hidden_states_2: torch.Tensor
    encoder_attention_mask: torch.Tensor
    prompt: str
    notes: tuple = ()

    def dit_inputs(self) -> dict:
        """Return the three tensors as keyword arguments of the DiT's forward."""
        return {"encoder_hidden_states": self.encoder_hidden_states,
                "encoder_hidden_states_2": self.encoder_hidden_states_2,
                "encoder_attention_mask": self.encoder_attention_mask}


STEPVIDEO_IMAGE_CONDITION = "STEPVIDEO_IMAGE_CONDITION"


@dataclasses.dataclass(frozen=True, eq=False)
class StepVideoImageCondition:
    """What a ``STEPVIDEO_IMAGE_CONDITION`` socket carries: a Step-Video-TI2V run's first-frame condition.

    `latent` is :func:`stepvideo_core.image_condition`'s output, fp32 on the CPU, in the official
    layout [1, frames/17*3, 64, height/16, width/16] (the image latent, then zeros); `width`,
    `height` and `frames` are the video size it was made for (the sampler's must equal them);
    `motion_score` is what the sampler passes to the model at every step.
    """

    latent: torch.Tensor
    width: int
    height: int
    frames: int
    motion_score: float


STEPVIDEO_VAE = "STEPVIDEO_VAE"


@dataclasses.dataclass(frozen=True)
class StepVideoVAEHandle:
    """What a ``STEPVIDEO_VAE`` socket carries: the loaded VAE and where it computes / rests.

    `vae` is the core :class:`~stepvideo_core.vae.StepVideoVAE` in `dtype`; it computes on `device` and
    rests on `offload_device`; `source` is the file it was loaded from. `patcher` is ComfyUI's
    ``ModelPatcher`` of the VAE inside ComfyUI (None elsewhere): ComfyUI's model management loads,
    accounts for and evicts the VAE through it.
    """

    vae: StepVideoVAE
    dtype: torch.dtype
    device: torch.device
    offload_device: torch.device
    source: Path
    patcher: object = None
