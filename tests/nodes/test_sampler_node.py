"""StepVideoSampler on a tiny DiT, without ComfyUI (the bridge's stand-ins and fakes)."""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import pytest
import torch

from stepvideo_core.sampling import SamplingSettings, sample
from tests.core.sampling.conftest import conditioning, tiny_model

SIZE = dict(width=32, height=48, frames=17)


@pytest.fixture(scope="module")
def dit():
    return tiny_model(torch.float32)


def handle(types_mod, dit, **kw):
    base = dict(transformer=dit, dtype=torch.float32, device=torch.device("cpu"),
                offload_device=torch.device("cpu"), attention="sdpa", source=Path("tiny"))
    base.update(kw)
    return types_mod.StepVideoModelHandle(**base)


def run(sampler_mod, model, pos, neg, **kw):
    args = dict(preset="Step-Video-T2V-Turbo", **SIZE, steps=2, cfg=0.0, shift=0.0, seed=3)
    args.update(kw)
    out = sampler_mod.StepVideoSampler().sample(model=model, positive=pos, negative=neg, **args)
    (latent,) = out["result"]
    return latent, out["ui"]["text"][0]


def test_registered(pack):
    assert "StepVideoSampler" in pack.NODE_CLASS_MAPPINGS
    inputs = pack.NODE_CLASS_MAPPINGS["StepVideoSampler"].INPUT_TYPES()["required"]
    assert inputs["positive"][0] == "STEPVIDEO_CONDITIONING" and inputs["model"][0] == "STEPVIDEO_MODEL"
    assert inputs["frames"][1]["step"] == 17 and inputs["width"][1]["step"] == 16


def test_latent_is_comfy_shaped_and_equals_the_core_sampler(sampler_mod, types_mod, dit):
    pos, neg = conditioning(1), conditioning(2)
    latent, text = run(sampler_mod, handle(types_mod, dit), pos, neg)
    core = sample(dit, pos, neg, settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=17.0, seed=3))  # Turbo
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 64, 3, 3, 2)  # [B, C, F, h, w]
    assert torch.equal(latent["samples"], core.transpose(1, 2))
    assert "2 steps, cfg 5, shift 17, seed 3" in text and "all 2 blocks in RAM" in text


def test_text_family_dataclass_is_accepted(sampler_mod, types_mod, dit):
    pos, neg = conditioning(1), conditioning(2)
    as_objects = [types_mod.StepVideoConditioning(c["encoder_hidden_states"], c["encoder_hidden_states_2"],
                                                  c["encoder_attention_mask"].long(), c["prompt"]) for c in (pos, neg)]
    a, _ = run(sampler_mod, handle(types_mod, dit), *as_objects)
    b, _ = run(sampler_mod, handle(types_mod, dit), pos, neg)
    assert torch.equal(a["samples"], b["samples"])  # int64 mask from the text encoder, cast like the official
    with pytest.raises(TypeError, match="STEPVIDEO_CONDITIONING"):
        run(sampler_mod, handle(types_mod, dit), "a prompt", neg)


def test_settings_from_preset_with_overrides(sampler_mod):
    assert sampler_mod.settings("Step-Video-T2V", 0, 0.0, 0.0) == {"steps": 50, "cfg": 9.0, "shift": 13.0}
    assert sampler_mod.settings("Step-Video-T2V", 30, 1.0, 0.0) == {"steps": 30, "cfg": 1.0, "shift": 13.0}


def test_no_guidance_ignores_the_negative(sampler_mod, types_mod, dit):
    latent, text = run(sampler_mod, handle(types_mod, dit), conditioning(1), None, cfg=1.0)
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


def test_progress_and_previews_every_step(sampler_mod, types_mod, dit, bridge, monkeypatch):
    calls = fake_progress(monkeypatch, bridge)
    run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=3, preview_vae=vae_handle(types_mod))
    assert [(v, t) for v, t, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    for _, _, (kind, image, size) in calls:
        assert kind == "JPEG" and image.mode == "RGB" and size == 512
        assert image.size == (2 * 85, 3 * 85)  # latent 3x2 cells enlarged to about 256 px


def test_without_a_preview_vae_progress_comes_without_preview_images(sampler_mod, types_mod, dit, bridge, monkeypatch):
    """The pack ships no latent->RGB factors (only a fit for the user's VAE means anything): no grey stand-in."""
    calls = fake_progress(monkeypatch, bridge)
    run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=2)
    assert calls == [(1, 2, None), (2, 2, None)]
    assert sampler_mod.preview_factors(None) is None


def test_interrupt_stops_between_blocks_and_restores_the_model(sampler_mod, types_mod, dit, bridge, monkeypatch):
    fake_progress(monkeypatch, bridge, on_update=lambda step: bridge.request_interrupt())
    empties = []
    monkeypatch.setattr(bridge, "empty_cache", lambda: empties.append(1))
    ptrs = {n: p.data_ptr() for n, p in dit.named_parameters()}
    with pytest.raises(bridge.StepVideoInterrupted):
        run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=3)
    assert not bridge.interrupt_requested()  # consumed
    assert empties == [1]
    assert {n: p.data_ptr() for n, p in dit.named_parameters()} == ptrs
    assert not dit._forward_pre_hooks and not any(b._forward_pre_hooks for b in dit.transformer_blocks)


def test_size_errors_name_the_nearest_valid_values(sampler_mod, types_mod, dit):
    with pytest.raises(ValueError, match="nearest valid: 528 or 544"):
        run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), height=540, width=992)


def test_gpu_plan_frees_memory_first_then_fits_the_free_vram(pack, sampler_mod, types_mod, bridge, monkeypatch):
    """The planning path of a CUDA handle (only bookkeeping runs: the bridge is faked)."""
    core = sys.modules[f"{pack.__name__}.stepvideo_core.sampling.run"]
    big = build_meta_30b()
    freed = []
    monkeypatch.setattr(bridge, "free_memory", lambda need, device=None: freed.append((need, device)))
    monkeypatch.setattr(bridge, "free_vram", lambda device=None: 24 * 1024 ** 3)
    def plan(model, frames):  # the node's plan: its DiT setup, ComfyUI making room (guided, 992x544)
        video = core.SamplingSettings(992, 544, frames, steps=50, cfg=9.0, shift=13.0)
        return core.plan_run(model.config, sampler_mod.dit_setup(model), video, device=model.device,
                        make_room=sampler_mod.make_room(model))

    cuda = handle(types_mod, big, dtype=torch.bfloat16, device=torch.device("cuda", 0), weight_format="fp8_scaled")
    planned = plan(cuda, 204)
    assert (planned["blocks_on_device"], planned["batch_cfg"], planned["fits"]) == (2, True, True)
    (need, device), = freed
    assert device == torch.device("cuda", 0) and need > 24 * 1024 ** 3  # asked for the fully resident run
    fixed = plan(handle(types_mod, big, dtype=torch.bfloat16, device=torch.device("cuda", 0), blocks_on_device="5"),
                 51)
    assert fixed["blocks_on_device"] == 5 and fixed["batch_cfg"]
    freed.clear()
    everything = plan(handle(types_mod, big, dtype=torch.bfloat16, device=torch.device("cuda", 0),
                             blocks_on_device="all"), 51)
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
    assert bridge.preview_image(None) is None  # nothing to show (no factors, previews off): no image
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


def vae_handle(types_mod, vae=None):
    """A STEPVIDEO_VAE handle of `vae` (a fresh 64-channel :class:`LinearVAE` by default) on the CPU."""
    return types_mod.StepVideoVAEHandle(vae=LinearVAE() if vae is None else vae, dtype=torch.float32,
                                        device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                        source=Path("tiny-vae"))


def test_preview_vae_colours_previews_and_is_fitted_once(sampler_mod, types_mod, dit, bridge, monkeypatch):
    vae = LinearVAE()
    preview_vae = vae_handle(types_mod, vae)
    calls = fake_progress(monkeypatch, bridge)
    for _ in range(2):
        run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=2, preview_vae=preview_vae)
    assert vae.calls == 4                       # four synthetic clips, fitted on the first run only
    image = calls[-1][2][1]
    r, g, b = (image.getchannel(c) for c in "RGB")
    assert r.tobytes() != b.tobytes()          # coloured: the fitted map, not one channel for all three


def test_preview_vae_for_other_latent_channels_sends_no_preview_image(sampler_mod, types_mod, dit, bridge, monkeypatch):
    preview_vae = vae_handle(types_mod, LinearVAE(channels=8))
    calls = fake_progress(monkeypatch, bridge)
    run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=1, preview_vae=preview_vae)
    assert preview_vae.vae.calls == 4 and calls == [(1, 1, None)]  # fitted, but for 8 channels, not the DiT's 64


class PreviewMethod(enum.Enum):
    """Stand-in for ComfyUI's ``comfy.cli_args.LatentPreviewMethod`` (same values)."""

    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


def fake_preview_method(monkeypatch, bridge, method: str):
    """Fake ``comfy.cli_args`` with ``args.preview_method`` = `method`; returns its ``args`` (to change it)."""
    args = types.SimpleNamespace(preview_method=PreviewMethod(method))
    monkeypatch.setitem(bridge._MODULES, "comfy.cli_args", types.SimpleNamespace(args=args))
    return args


def test_bridge_reads_comfyuis_preview_method_on_every_call(bridge, monkeypatch):
    assert bridge.preview_method() == "auto" and bridge.previews_enabled()  # outside ComfyUI: previews on
    args = fake_preview_method(monkeypatch, bridge, "none")
    assert bridge.preview_method() == "none" and not bridge.previews_enabled()
    for method in ("auto", "latent2rgb", "taesd"):  # the frontend's setting changes it per prompt
        args.preview_method = PreviewMethod(method)
        assert bridge.preview_method() == method and bridge.previews_enabled()
    del args.preview_method  # a ComfyUI without the setting
    assert bridge.preview_method() == "auto" and bridge.previews_enabled()


def test_previews_follow_comfyuis_preview_size(bridge, monkeypatch):
    rgb = torch.zeros(34, 62, 3, dtype=torch.uint8)
    assert bridge.preview_image(rgb)[2] == 512  # outside ComfyUI: ComfyUI's default
    args = fake_preview_method(monkeypatch, bridge, "auto")
    args.preview_size = 256
    assert bridge.preview_max_size() == 256 and bridge.preview_image(rgb)[2] == 256
    for odd in (0, -3, None, "big", True):  # not a size: the default
        args.preview_size = odd
        assert bridge.preview_max_size() == 512


def test_preview_method_none_computes_no_preview(sampler_mod, types_mod, dit, bridge, monkeypatch):
    """ComfyUI's preview method "none": progress every step, no image, and no VAE fit for one."""
    fake_preview_method(monkeypatch, bridge, "none")
    preview_vae = vae_handle(types_mod)
    calls = fake_progress(monkeypatch, bridge)
    run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=2, preview_vae=preview_vae)
    assert calls == [(1, 2, None), (2, 2, None)] and preview_vae.vae.calls == 0


@pytest.mark.parametrize("method", ["auto", "latent2rgb", "taesd"])
def test_other_preview_methods_get_the_latent2rgb_previews(sampler_mod, types_mod, dit, bridge, monkeypatch, method):
    """auto and latent2rgb ask for latent->RGB previews; taesd has no Step-Video decoder, so it gets them too."""
    fake_preview_method(monkeypatch, bridge, method)
    preview_vae = vae_handle(types_mod)
    calls = fake_progress(monkeypatch, bridge)
    run(sampler_mod, handle(types_mod, dit), conditioning(1), conditioning(2), steps=2, preview_vae=preview_vae)
    assert preview_vae.vae.calls == 4 and [(v, t) for v, t, _ in calls] == [(1, 2), (2, 2)]
    assert all(preview[0] == "JPEG" for _, _, preview in calls)
