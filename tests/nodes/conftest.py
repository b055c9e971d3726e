"""Fixtures the node tests share: the pack's node modules (ComfyUI forced absent) and a tiny CPU model handle."""

from __future__ import annotations

import dataclasses
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


@pytest.fixture
def fake_gpu(bridge, monkeypatch):
    """Make the bridge report a CUDA device with ``free`` bytes of free VRAM: call ``fake_gpu(free)``.

    Only the planning inputs are faked (``free_vram``, and ``free_memory``, which records what the
    sampler asked ComfyUI to free); a handle whose ``device`` is ``cuda`` then takes the GPU branch of
    the sampler's plan.  Returns the list of ``(bytes, device)`` free requests.
    """
    freed = []

    def setup(free: int):
        monkeypatch.setattr(bridge, "free_memory", lambda need=None, device=None: freed.append((need, device)))
        monkeypatch.setattr(bridge, "free_vram", lambda device=None: free)
        return freed

    return setup


def fields(settings) -> dict:
    """A dataclass's fields by name, the values themselves (not deep copies, as dataclasses.asdict makes)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


@pytest.fixture
def sample_calls(pack, sampler_mod, monkeypatch):
    """Spy on the core ``sample`` the sampler node calls; returns the list of recorded calls.

    Each call is recorded as its keyword arguments, with the fields of its ``settings`` and ``placement``
    spelled out (``frames``, ``device``, ``blocks_on_device``, ``kept``...), plus ``"streamer"``: the
    :class:`~stepvideo_core.offload.BlockStreamer` the core sampler built for it (its ``resident``,
    ``streamed``, ``mode`` and ``trace`` tell what was really streamed).  The real sampler then runs:
    a handle on a fake ``cuda`` device (see :func:`fake_gpu`) computes on the CPU instead, with the
    streamer in ``"copy"`` mode, so the plan's streamed blocks are copied into device slots for real.
    A model on the meta device (the 30B shapes, for planning) is not run: zeros of the latent shape.
    """
    core = sys.modules[f"{pack.__name__}.stepvideo_core.sampling.sampler"]
    real_sample, real_streamer = sampler_mod.sample, core.BlockStreamer
    calls = []

    class RecordingStreamer(real_streamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            calls[-1]["streamer"] = self

    def spy(transformer, positive, negative=None, *, settings, placement, **kwargs):
        calls.append(dict(kwargs, **fields(settings), **fields(placement), streamer=None))
        if next(transformer.parameters()).is_meta:
            b = positive["encoder_hidden_states"].shape[0]
            return torch.zeros(b, settings.frames // 17 * 3, transformer.config.in_channels,
                               settings.height // 16, settings.width // 16)
        if torch.device(placement.device).type != "cpu":
            placement = dataclasses.replace(placement, device=torch.device("cpu"), streamer_mode="copy")
        return real_sample(transformer, positive, negative, settings=settings, placement=placement, **kwargs)

    monkeypatch.setattr(core, "BlockStreamer", RecordingStreamer)
    monkeypatch.setattr(sampler_mod, "sample", spy)
    return calls
