"""Fixtures the node tests share: the pack's node modules (ComfyUI forced absent) and a tiny CPU model handle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.core.sampling.conftest import tiny_model


@pytest.fixture
def sampler_mod(pack, bridge):
    """The pack's nodes.sampler module."""
    return sys.modules[f"{pack.__name__}.nodes.sampler"]


@pytest.fixture
def lora_mod(pack, bridge):
    """The pack's nodes.lora module."""
    return sys.modules[f"{pack.__name__}.nodes.lora"]


@pytest.fixture
def types_mod(pack):
    """The pack's nodes.types module (the socket value classes)."""
    return sys.modules[f"{pack.__name__}.nodes.types"]


@pytest.fixture(scope="module")
def dit(one_thread):
    """The tiny official-shaped DiT in fp32 on the CPU (shared by a module's tests)."""
    return tiny_model(torch.float32)


@pytest.fixture
def base(types_mod, dit):
    """A STEPVIDEO_MODEL handle of :func:`dit` computing on the CPU with SDPA."""
    return types_mod.StepVideoModelHandle(transformer=dit, dtype=torch.float32, device=torch.device("cpu"),
                                          offload_device=torch.device("cpu"), attention="sdpa", source=Path("tiny"))
