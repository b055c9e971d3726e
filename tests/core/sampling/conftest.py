"""A tiny DiT and matching conditioning for sampler tests (built in memory, no files)."""

import pytest
import torch

from stepvideo_core import build_transformer
from stepvideo_core.tiny import TINY_DIT_CONFIG, tiny_dit_state_dict

LLM_TOKENS = 6


def tiny_model(dtype=torch.float32, seed=0, config=None):
    """The tiny official-shaped DiT with deterministic random weights, on the CPU in ``dtype``."""
    config = dict(config or TINY_DIT_CONFIG)
    model = build_transformer(config, device="meta", dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in tiny_dit_state_dict(config, seed).items()}, assign=True)
    return model.eval()


def conditioning(seed=0, valid=4, batch=1, config=None):
    """A STEPVIDEO_CONDITIONING-like dict for the tiny DiT: 77 CLIP ones + ``valid`` LLM tokens in the mask."""
    config = dict(config or TINY_DIT_CONFIG)
    llm, clip = config["caption_channels"]
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 77 + LLM_TOKENS)
    mask[:, :77 + valid] = 1
    return {"encoder_hidden_states": torch.randn(batch, LLM_TOKENS, llm, generator=gen),
            "encoder_hidden_states_2": torch.randn(batch, 77, clip, generator=gen),
            "encoder_attention_mask": mask, "prompt": f"tiny prompt {seed}"}


@pytest.fixture(scope="module")
def model32():
    return tiny_model(torch.float32)


@pytest.fixture(scope="module")
def model16():
    return tiny_model(torch.bfloat16)


@pytest.fixture
def pos():
    return conditioning(1, valid=5)


@pytest.fixture
def neg():
    return conditioning(2, valid=2)
