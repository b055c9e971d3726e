"""Step-Video-T2V in pure PyTorch: the model code behind the ComfyUI-StepVideo pack.

Never imports ComfyUI; usable and testable on its own.  Public API:

* :func:`build_transformer` / :func:`load_transformer` - the 30B DiT.
* :class:`StepVideoDiTConfig` - its config (mirrors ``transformer/config.json``).
* :func:`build_vae` / :func:`load_vae` - the Video-VAE v2 (``vae/vae_v2.safetensors``).
* :func:`load_text_encoder` - Step-LLM + HunyuanCLIP; ``.encode(prompts)`` gives the DiT's text inputs.
* :func:`load_step_llm` / :func:`build_step_llm` - the bare 19.6B Step-LLM (loaded / without weights).
* :data:`POSITIVE_MAGIC`, :data:`NEGATIVE_PROMPT`, :func:`with_magic` - the official prompt conventions.
* :func:`flow_match_sigmas` - the official sampling schedule; :func:`sample` - the denoising loop.
* :func:`load_lora`, :class:`LoraEntry`, :func:`attached` - LoRA adapters: validate, then apply for a run
  (merged or on the fly) with the exact base weights restored afterwards (see :mod:`stepvideo_core.lora`).
* :class:`CheckpointError` - raised for files that do not fit, with what was expected and found.
"""

from .checkpoint import CheckpointError, identify_checkpoint
from .dit import ConfigError, StepVideoDiTConfig, StepVideoTransformer, build_transformer
from .dit.loader import load_transformer
from .text import (NEGATIVE_PROMPT, POSITIVE_MAGIC, StepLLM, StepLLMConfig, StepVideoTextEncoder, build_step_llm,
                   load_step_llm, load_text_encoder, with_magic)
from .sampling import flow_match_sigmas, sample
from .vae import build_vae, load_vae
from .lora import LoraAdapter, LoraEntry, LoraError, attached, extract_lora, load_lora

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "StepVideoDiTConfig", "StepVideoTransformer", "build_transformer",
           "identify_checkpoint", "load_transformer", "build_vae", "load_vae", "NEGATIVE_PROMPT", "POSITIVE_MAGIC",
           "StepLLM", "StepLLMConfig", "StepVideoTextEncoder", "build_step_llm", "load_step_llm", "load_text_encoder",
           "with_magic", "flow_match_sigmas", "sample", "LoraAdapter", "LoraEntry", "LoraError", "attached",
           "extract_lora", "load_lora", "__version__"]
