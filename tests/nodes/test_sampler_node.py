"""StepVideoSampler on a tiny DiT, without ComfyUI (the bridge's stand-ins and fakes)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from stepvideo_core.sampling import sample
from tests.core.sampling.conftest import conditioning, tiny_model

SIZE = dict(width=32, height=48, frames=17)


@pytest.fixture
def node_mod(pack, bridge):
    return sys.modules[f"{pack.__name__}.nodes.sampler"]


@pytest.fixture
def types_mod(pack):
    return sys.modules[f"{pack.__name__}.nodes.types"]


@pytest.fixture(scope="module")
def dit():
    return tiny_model(torch.float32)


def handle(types_mod, dit, **kw):
    base = dict(transformer=dit, dtype=torch.float32, device=torch.device("cpu"),
                offload_device=torch.device("cpu"), attention="sdpa", source=Path("tiny"))
    base.update(kw)
    return types_mod.StepVideoModelHandle(**base)


def run(node_mod, model, pos, neg, **kw):
    args = dict(preset="Step-Video-T2V-Turbo", **SIZE, steps=2, cfg=0.0, shift=0.0, seed=3)
    args.update(kw)
    out = node_mod.StepVideoSampler().sample(model=model, positive=pos, negative=neg, **args)
    (latent,) = out["result"]
    return latent, out["ui"]["text"][0]


def test_registered(pack):
    assert "StepVideoSampler" in pack.NODE_CLASS_MAPPINGS
    inputs = pack.NODE_CLASS_MAPPINGS["StepVideoSampler"].INPUT_TYPES()["required"]
    assert inputs["positive"][0] == "STEPVIDEO_CONDITIONING" and inputs["model"][0] == "STEPVIDEO_MODEL"
    assert inputs["frames"][1]["step"] == 17 and inputs["width"][1]["step"] == 16


def test_latent_is_comfy_shaped_and_equals_the_core_sampler(node_mod, types_mod, dit):
    pos, neg = conditioning(1), conditioning(2)
    latent, text = run(node_mod, handle(types_mod, dit), pos, neg)
    core = sample(dit, pos, neg, **SIZE, steps=2, cfg=5.0, shift=17.0, seed=3)  # Turbo preset, steps overridden
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 64, 3, 3, 2)  # [B, C, F, h, w]
    assert torch.equal(latent["samples"], core.transpose(1, 2))
    assert "2 steps, cfg 5, shift 17, seed 3" in text and "all 2 blocks in RAM" in text


def test_text_family_dataclass_is_accepted(node_mod, types_mod, dit):
    pos, neg = conditioning(1), conditioning(2)
    as_objects = [types_mod.StepVideoConditioning(c["encoder_hidden_states"], c["encoder_hidden_states_2"],
                                                  c["encoder_attention_mask"].long(), c["prompt"]) for c in (pos, neg)]
    a, _ = run(node_mod, handle(types_mod, dit), *as_objects)
    b, _ = run(node_mod, handle(types_mod, dit), pos, neg)
    assert torch.equal(a["samples"], b["samples"])  # int64 mask from the text encoder, cast like the official
    with pytest.raises(TypeError, match="STEPVIDEO_CONDITIONING"):
        run(node_mod, handle(types_mod, dit), "a prompt", neg)


def test_settings_from_preset_with_overrides(node_mod):
    assert node_mod.settings("Step-Video-T2V", 0, 0.0, 0.0) == {"steps": 50, "cfg": 9.0, "shift": 13.0}
    assert node_mod.settings("Step-Video-T2V", 30, 1.0, 0.0) == {"steps": 30, "cfg": 1.0, "shift": 13.0}


def test_no_guidance_ignores_the_negative(node_mod, types_mod, dit):
    latent, text = run(node_mod, handle(types_mod, dit), conditioning(1), None, cfg=1.0)
    assert "cfg 1" in text and latent["samples"].shape == (1, 64, 3, 3, 2)


def fake_progress(monkeypatch, bridge, on_update=None):
    calls = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls.append((value, total, preview))
            if on_update:
                on_update(value)

    monkeypatch.setitem(bridge._MODULES, "comfy.utils", types.SimpleNamespace(ProgressBar=ProgressBar))
    return calls


def test_progress_and_previews_every_step(node_mod, types_mod, dit, bridge, monkeypatch):
    calls = fake_progress(monkeypatch, bridge)
    run(node_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=3)
    assert [(v, t) for v, t, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    kind, image, size = calls[-1][2]
    assert kind == "JPEG" and image.mode == "RGB" and size == 512
    assert image.size == (2 * 85, 3 * 85)  # latent 3x2 cells enlarged to about 256 px


def test_interrupt_stops_between_blocks_and_restores_the_model(node_mod, types_mod, dit, bridge, monkeypatch):
    fake_progress(monkeypatch, bridge, on_update=lambda step: bridge.request_interrupt())
    empties = []
    monkeypatch.setattr(bridge, "empty_cache", lambda: empties.append(1))
    ptrs = {n: p.data_ptr() for n, p in dit.named_parameters()}
    with pytest.raises(bridge.StepVideoInterrupted):
        run(node_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=3)
    assert not bridge.interrupt_requested()  # consumed
    assert empties == [1]
    assert {n: p.data_ptr() for n, p in dit.named_parameters()} == ptrs
    assert not dit._forward_pre_hooks and not any(b._forward_pre_hooks for b in dit.transformer_blocks)


def test_size_errors_name_the_nearest_valid_values(node_mod, types_mod, dit):
    with pytest.raises(ValueError, match="nearest valid: 528 or 544"):
        run(node_mod, handle(types_mod, dit), conditioning(1), conditioning(2), height=540, width=992)


def test_gpu_plan_frees_memory_first_then_fits_the_free_vram(node_mod, types_mod, bridge, monkeypatch):
    """The planning path of a CUDA handle (only bookkeeping runs: the bridge is faked)."""
    big = build_meta_30b()
    freed = []
    monkeypatch.setattr(bridge, "free_memory", lambda need, device=None: freed.append((need, device)))
    monkeypatch.setattr(bridge, "free_vram", lambda device=None: 24 * 1024 ** 3)
    cuda = handle(types_mod, big, dtype=torch.bfloat16, device=torch.device("cuda", 0), weight_format="fp8_scaled")
    plan = node_mod.plan_blocks(cuda, 992, 544, 204, guided=True)
    assert (plan["blocks_on_device"], plan["batch_cfg"], plan["fits"]) == (2, True, True)
    (need, device), = freed
    assert device == torch.device("cuda", 0) and need > 24 * 1024 ** 3  # asked for the fully resident run
    fixed = node_mod.plan_blocks(handle(types_mod, big, dtype=torch.bfloat16, device=torch.device("cuda", 0),
                                        blocks_on_device="5"), 992, 544, 51, guided=True)
    assert fixed["blocks_on_device"] == 5 and fixed["batch_cfg"]
    freed.clear()
    everything = node_mod.plan_blocks(handle(types_mod, big, dtype=torch.bfloat16, device=torch.device("cuda", 0),
                                             blocks_on_device="all"), 992, 544, 51, guided=True)
    assert everything["blocks_on_device"] == 48
    (need, _), = freed  # "all" asks ComfyUI for the room too (a text encoder may still hold the GPU)
    assert need > 48 * 1.2e9


def build_meta_30b():
    from stepvideo_core import build_transformer
    return build_transformer(None, device="meta", dtype=torch.bfloat16)


def test_bridge_preview_and_cache_helpers(bridge, monkeypatch):
    rgb = torch.zeros(34, 62, 3, dtype=torch.uint8)
    kind, image, size = bridge.preview_image(rgb)
    assert kind == "JPEG" and image.size == (62 * 4, 34 * 4)
    emptied = []
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management",
                        types.SimpleNamespace(soft_empty_cache=lambda: emptied.append(1)))
    bridge.empty_cache()
    assert emptied == [1]


class LinearVAE:
    """Stand-in VAE for previews: latents are a fixed linear map of the 16x16-pooled frames."""

    def __init__(self, channels=64):
        self.map = torch.randn(3, channels, generator=torch.Generator().manual_seed(5))
        self.calls = 0

    def encode(self, video, sample=False):
        self.calls += 1
        b, t, _, h, w = video.shape
        pooled = torch.nn.functional.adaptive_avg_pool3d(video.permute(0, 2, 1, 3, 4), (t // 17 * 3, h // 16, w // 16))
        return (pooled.permute(0, 2, 3, 4, 1) @ self.map).permute(0, 1, 4, 2, 3)


def test_preview_vae_colours_previews_and_is_fitted_once(pack, node_mod, types_mod, dit, bridge, monkeypatch):
    vae_nodes = sys.modules[f"{pack.__name__}.nodes.vae"]
    vae = LinearVAE()
    preview_vae = vae_nodes.StepVideoVAEHandle(vae=vae, dtype=torch.float32, device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"), source=Path("tiny-vae"))
    calls = fake_progress(monkeypatch, bridge)
    for _ in range(2):
        run(node_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=2, preview_vae=preview_vae)
    assert vae.calls == 4                       # four synthetic clips, fitted on the first run only
    image = calls[-1][2][1]
    r, g, b = (image.getchannel(c) for c in "RGB")
    assert r.tobytes() != b.tobytes()          # coloured, not the grey fallback


def test_preview_vae_for_other_latent_channels_falls_back_to_grey(pack, node_mod, types_mod, dit, bridge, monkeypatch):
    vae_nodes = sys.modules[f"{pack.__name__}.nodes.vae"]
    preview_vae = vae_nodes.StepVideoVAEHandle(vae=LinearVAE(channels=8), dtype=torch.float32,
                                               device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                               source=Path("tiny-vae"))
    calls = fake_progress(monkeypatch, bridge)
    run(node_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=1, preview_vae=preview_vae)
    image = calls[-1][2][1]
    assert image.getchannel("R").tobytes() == image.getchannel("B").tobytes()
