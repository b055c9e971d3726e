"""Tiny checkpoints in the exact official file layout, for every loader test.

Real weights cannot be downloaded here, so tests write small random models
with the official key names, shard naming, index json and config.json, and
load them through the same loaders that read the released files.  The writers
live in :mod:`stepvideo_core.tiny` (the CLI's smoke checks use them too).
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from stepvideo_core.tiny import (DIT_WEIGHTS, TINY_DIT_CONFIG, dit_config_json, random_state_dict,  # noqa: F401
                                 tiny_dit_state_dict, write_dit_checkpoint, write_sharded, write_tiny_dit)
from stepvideo_core.tiny import (TINY_CLIP_CONFIG, TINY_LLM_CONFIG, TINY_TEXT_CORPUS, step_llm_config_json,  # noqa: F401
                                 tiny_clip_vocab, tiny_step_llm_state_dict, train_tiny_step_tokenizer,
                                 write_tiny_hunyuan_clip, write_tiny_step_llm, write_tiny_text_encoders)
from stepvideo_core.vae import build_vae
from stepvideo_core.vae.loader import to_disk_name


# --------------------------------------------------------------------------- VAE

# Same shape family as the official VAE parity fixture (tests/fixtures/stepvideo_vae_tiny.safetensors).
TINY_VAE_CONFIG = dict(z_channels=8, enc_ch=32, enc_ch_mult=(1, 1, 1, 1), dec_ch=32, dec_ch_mult=(1, 1, 1, 1),
                       num_res_blocks=2)


def tiny_vae_state_dict(config=None, seed: int = 0, dtype=None) -> dict:
    """Random VAE v2 weights under the *on-disk* names of ``vae_v2.safetensors`` (default: tiny config)."""
    model = build_vae(dict(TINY_VAE_CONFIG) if config is None else config, device="meta")
    shapes = {to_disk_name(k): v.shape for k, v in model.state_dict().items()}
    return random_state_dict(shapes, seed, dtype or torch.float32)


def write_tiny_vae(directory, seed: int = 0, config=None, layout: str = "official", prefix: str = "",
                   state_dict=None):
    """A tiny random VAE v2 file (fp32 like the release); returns its path.

    layout "official": ``<dir>/vae/vae_v2.safetensors``; "single": ``<dir>/stepvideo_vae.safetensors``.
    Keys get ``prefix`` (e.g. ``"vae."``); ``state_dict`` (on-disk names) replaces the random weights.
    """
    weights = tiny_vae_state_dict(config, seed) if state_dict is None else state_dict
    directory = Path(directory)
    if layout == "official":
        path = directory / "vae" / "vae_v2.safetensors"
    elif layout == "single":
        path = directory / "stepvideo_vae.safetensors"
    else:
        raise ValueError(f"layout must be 'official' or 'single', got {layout!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, str(path))
    return path
