"""Step-Video-T2V and -TI2V in pure PyTorch: the model code behind the ComfyUI-StepVideo pack.

Never imports ComfyUI; usable and testable on its own.  Public API:

* :func:`build_transformer` / :func:`load_transformer` - the 30B DiT (T2V, Turbo, or TI2V when
  ``model.is_ti2v``: told from the weights).
* :class:`StepVideoDiTConfig` - its config (mirrors ``transformer/config.json``).
* :func:`build_vae` / :func:`load_vae` - the Video-VAE v2 (``vae/vae_v2.safetensors``).
* :func:`load_text_encoder` - Step-LLM + HunyuanCLIP; ``.encode(prompts)`` gives the DiT's text inputs.
* :func:`load_step_llm` / :func:`build_step_llm` - the bare 19.6B Step-LLM (loaded / without weights).
* :data:`POSITIVE_MAGIC`, :data:`NEGATIVE_PROMPT`, :func:`with_magic` - the official prompt conventions;
  :data:`TI2V_MAGIC`, :data:`TI2V_NEGATIVE_PROMPT` the image-to-video pair, :func:`magic_prompts` picks by mode.
* :func:`flow_match_sigmas` - the official sampling schedule; :func:`sample` - the denoising loop, given
  a :class:`SamplingSettings` (size, steps, cfg, shift, seed; TI2V's motion score) and a :class:`Placement`
  (device, block streaming, CFG batching); ``condition=`` is TI2V's first-frame condition.
* :func:`resize_and_crop`, :func:`image_condition`, :func:`image_from_file` - the TI2V first-frame
  condition: image -> covering resize + centre crop -> VAE latent -> zero-padded condition.
* :func:`load_lora`, :class:`LoraEntry`, :func:`attached` - LoRA adapters: validate, then apply for a run
  (merged or on the fly) with the exact base weights restored afterwards (see :mod:`stepvideo_core.lora`).
* :class:`CheckpointError` - raised for files that do not fit, with what was expected and found.
"""

from .checkpoint import CheckpointError, identify_checkpoint
from .dit import ConfigError, StepVideoDiTConfig, StepVideoTransformer, build_transformer
from .dit.loader import load_transformer
from .text import (NEGATIVE_PROMPT, POSITIVE_MAGIC, TI2V_MAGIC, TI2V_NEGATIVE_PROMPT, StepLLM, StepLLMConfig,
                   StepVideoTextEncoder, build_step_llm, load_step_llm, load_text_encoder, magic_prompts, with_magic)
from .sampling import Placement, SamplingSettings, flow_match_sigmas, sample
from .condition import ImageConditionError, image_condition, image_from_file, resize_and_crop
from .vae import build_vae, load_vae
from .lora import LoraAdapter, LoraEntry, LoraError, attached, extract_lora, load_lora

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "StepVideoDiTConfig", "StepVideoTransformer", "build_transformer",
           "identify_checkpoint", "load_transformer", "build_vae", "load_vae", "NEGATIVE_PROMPT", "POSITIVE_MAGIC",
           "StepLLM", "StepLLMConfig", "StepVideoTextEncoder", "build_step_llm", "load_step_llm", "load_text_encoder",
           "with_magic", "TI2V_MAGIC", "TI2V_NEGATIVE_PROMPT", "magic_prompts", "flow_match_sigmas", "sample",
           "SamplingSettings", "Placement", "ImageConditionError", "image_condition", "image_from_file",
           "resize_and_crop", "LoraAdapter", "LoraEntry", "LoraError", "attached", "extract_lora", "load_lora",
           "__version__"]
