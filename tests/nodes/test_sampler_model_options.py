"""The loader options the sampler relies on: weight format (fp8_scaled / auto-detect) and blocks_on_device."""

from __future__ import annotations

import sys

import pytest
import torch

from stepvideo_core.convert import convert_to_fp8
from tests.core.sampling.conftest import conditioning
from tests.factory import write_tiny_dit


@pytest.fixture
def model_mod(pack, bridge):
    return sys.modules[f"{pack.__name__}.nodes.model"]


@pytest.fixture
def sampler_mod(pack, bridge):
    return sys.modules[f"{pack.__name__}.nodes.sampler"]


@pytest.fixture
def entries(models_dir):
    dit_dir = models_dir / "diffusion_models"
    write_tiny_dit(dit_dir / "stepvideo-t2v-tiny", layout="official")
    convert_to_fp8(dit_dir / "stepvideo-t2v-tiny", dit_dir / "tiny_fp8_scaled.safetensors")
    return "stepvideo-t2v-tiny", "tiny_fp8_scaled.safetensors"


def load(model_mod, name, weight_dtype, blocks_on_device="auto"):
    out = model_mod.StepVideoModelLoader().load(model=name, weight_dtype=weight_dtype, attention="sdpa",
                                                blocks_on_device=blocks_on_device)
    return out["result"][0], out["ui"]["text"][0]


def is_fp8(handle, layer="transformer_blocks.0.ff.net.2"):
    return handle.transformer.get_submodule(layer).weight.dtype == torch.float8_e4m3fn


def test_weight_choices(model_mod, entries):
    bf16_dir, fp8_file = entries
    auto_full, _ = load(model_mod, bf16_dir, "auto")
    assert auto_full.weight_format == "full" and not is_fp8(auto_full) and auto_full.dtype == torch.float32
    auto_fp8, text = load(model_mod, fp8_file, "auto")
    assert auto_fp8.weight_format == "fp8_scaled" and is_fp8(auto_fp8) and auto_fp8.dtype == torch.float32
    assert "fp8_scaled blocks, compute float32" in text and "blocks on device: auto" in text
    quantised, _ = load(model_mod, bf16_dir, "fp8_scaled")
    assert quantised.weight_format == "fp8_scaled" and is_fp8(quantised)
    full, _ = load(model_mod, fp8_file, "bf16")  # a pre-quantised file, dequantised on request
    assert full.weight_format == "full" and full.dtype == torch.bfloat16 and not is_fp8(full)
    assert model_mod.resolve_weight_choice("fp8_scaled", torch.device("cuda")) == (torch.bfloat16, "fp8_scaled")
    with pytest.raises(ValueError, match="weight_dtype"):
        model_mod.resolve_weight_choice("fp8_e5m2", torch.device("cpu"))


def sample_once(sampler_mod, handle):
    return sampler_mod.StepVideoSampler().sample(model=handle, positive=conditioning(1), negative=conditioning(2),
                                                 preset="Step-Video-T2V-Turbo", width=32, height=32, frames=17,
                                                 steps=1, cfg=0.0, shift=0.0, seed=0)


def test_blocks_on_device_choice_reaches_the_sampler(model_mod, sampler_mod, entries, bridge, monkeypatch,
                                                     fake_gpu, sample_calls):
    """The loader's widget travels on the handle to the plan; what the plan then does depends on the device:
    on the CPU every block stays in RAM (nothing to stream to), on a GPU the streamer keeps that many
    blocks there and streams the others (the GPU is faked, the run computes on the CPU; see conftest.py)."""
    handle, text = load(model_mod, entries[0], "fp8_scaled", blocks_on_device="1")
    assert handle.blocks_on_device == "1" and "blocks on device: 1" in text
    out = sample_once(sampler_mod, handle)
    assert out["result"][0]["samples"].shape == (1, 64, 3, 2, 2)
    assert sample_calls[-1]["blocks_on_device"] is None and sample_calls[-1]["streamer"].streamed == []
    assert "all 2 blocks in RAM" in out["ui"]["text"][0]

    fake_gpu(80 * 1024 ** 3)
    monkeypatch.setattr(bridge, "torch_device", lambda: torch.device("cuda", 0))
    gpu, text = load(model_mod, entries[0], "fp8_scaled", blocks_on_device="1")
    assert gpu.device == torch.device("cuda", 0) and gpu.dtype == torch.bfloat16 and "compute on cuda:0" in text
    out = sample_once(sampler_mod, gpu)
    assert out["result"][0]["samples"].shape == (1, 64, 3, 2, 2)
    call = sample_calls[-1]
    assert call["device"] == torch.device("cuda", 0) and call["blocks_on_device"] == 1
    assert (call["streamer"].resident, call["streamer"].streamed) == ([0], [1])
    assert "1 of 2 blocks on the device, 1 streamed" in out["ui"]["text"][0]
    everything, _ = load(model_mod, entries[0], "fp8_scaled", blocks_on_device="all")
    sample_once(sampler_mod, everything)
    assert sample_calls[-1]["blocks_on_device"] is None and sample_calls[-1]["streamer"].streamed == []
    with pytest.raises(ValueError, match="blocks_on_device"):
        load(model_mod, entries[0], "auto", blocks_on_device="49")
    assert model_mod.StepVideoModelLoader.INPUT_TYPES()["required"]["blocks_on_device"][1]["default"] == "auto"
