"""The two text encoders of Step-Video-T2V and the conditioning they produce for the DiT.

* :mod:`.step_llm` - the 19.6B Step-LLM in pure PyTorch (replaces the closed CUDA op);
* :mod:`.llm_loader` - strict loading of ``step_llm/``;
* :mod:`.tokenizer` - the SentencePiece tokenizer with the official padding rules;
* :mod:`.clip` - HunyuanCLIP (a transformers BertModel) from ``hunyuan_clip/``;
* :mod:`.streaming` - resident / layer-streamed / CPU execution and the plan deciding it;
* :mod:`.encoder` - prompts -> ``encoder_hidden_states``, ``encoder_hidden_states_2``,
  ``encoder_attention_mask``; prompt conventions; the cache.
"""

from .clip import HunyuanClip, load_hunyuan_clip
from .encoder import (MAGIC_PROMPTS, NEGATIVE_PROMPT, OUTPUT_KEYS, POSITIVE_MAGIC, TI2V_MAGIC, TI2V_NEGATIVE_PROMPT,
                      StepVideoTextEncoder, load_text_encoder, magic_prompts, with_magic)
from .llm_loader import load_step_llm
from .step_llm import StepLLM, StepLLMConfig, build_step_llm
from .streaming import plan, run_step_llm
from .tokenizer import StepTokenizer

__all__ = ["HunyuanClip", "MAGIC_PROMPTS", "NEGATIVE_PROMPT", "OUTPUT_KEYS", "POSITIVE_MAGIC", "StepLLM",
           "StepLLMConfig", "StepTokenizer", "StepVideoTextEncoder", "TI2V_MAGIC", "TI2V_NEGATIVE_PROMPT",
           "build_step_llm", "load_hunyuan_clip", "load_step_llm", "load_text_encoder", "magic_prompts", "plan",
           "run_step_llm", "with_magic"]
