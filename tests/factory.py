"""Tiny checkpoints in the exact official file layout, for every loader test.

Real weights cannot be downloaded here, so tests write small random models
with the official key names, shard naming, index json and config.json, and
load them through the same loaders that read the released files.  The writers
live in :mod:`stepvideo_core.tiny` (the CLI's smoke checks use them too).
"""

from stepvideo_core.tiny import (DIT_WEIGHTS, TINY_DIT_CONFIG, dit_config_json, random_state_dict,  # noqa: F401
                                 tiny_dit_state_dict, write_dit_checkpoint, write_sharded, write_tiny_dit)
from stepvideo_core.tiny import (TINY_CLIP_CONFIG, TINY_LLM_CONFIG, TINY_TEXT_CORPUS, step_llm_config_json,  # noqa: F401
                                 tiny_clip_vocab, tiny_step_llm_state_dict, train_tiny_step_tokenizer,
                                 write_tiny_hunyuan_clip, write_tiny_step_llm, write_tiny_text_encoders)
from stepvideo_core.tiny import TINY_VAE_CONFIG, tiny_vae_state_dict, write_tiny_vae  # noqa: F401


# --------------------------------------------------------------------------- LoRA

from stepvideo_core.tiny import (LORA_KEY_FORMATS, TINY_LORA_EXTRA, TINY_LORA_STYLES, tiny_lora,  # noqa: E402,F401
                                 tiny_lora_layers, write_tiny_lora)
