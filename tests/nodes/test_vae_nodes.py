"""StepVideo VAE nodes on a tiny VAE v2 file, without ComfyUI."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from stepvideo_core import load_vae
from tests.factory import write_tiny_vae


@pytest.fixture
def vae_mod(pack, bridge):
    """The pack's nodes.vae module (ComfyUI forced absent by the `bridge` fixture)."""
    return sys.modules[f"{pack.__name__}.nodes.vae"]


@pytest.fixture
def vae_file(models_dir):
    return write_tiny_vae(models_dir / "vae", layout="single", seed=2)


@pytest.fixture
def handle(vae_mod, vae_file):
    out = vae_mod.StepVideoVAELoader().load(vae_name=vae_file.name, weight_dtype="fp32")
    return out["result"][0]


def test_nodes_are_registered(pack):
    for node_id in ("StepVideoVAELoader", "StepVideoVAEDecode", "StepVideoVAEEncode"):
        assert node_id in pack.NODE_CLASS_MAPPINGS
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("StepVideo")


def test_loader_lists_and_loads(vae_mod, types_mod, vae_file):
    options = vae_mod.StepVideoVAELoader.INPUT_TYPES()["required"]["vae_name"][0]
    assert options == [vae_file.name]
    assert vae_mod.StepVideoVAELoader.RETURN_TYPES == (types_mod.STEPVIDEO_VAE,) == ("STEPVIDEO_VAE",)
    out = vae_mod.StepVideoVAELoader().load(vae_name=vae_file.name, weight_dtype="default")
    (handle,) = out["result"]
    assert isinstance(handle, types_mod.StepVideoVAEHandle)  # the socket types live together in nodes/types.py
    assert handle.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert handle.vae.config.z_channels == 8 and handle.source == vae_file.resolve()
    (text,) = out["ui"]["text"]
    assert "8 latent channels" in text and vae_file.name in text
    assert isinstance(vae_mod.StepVideoVAELoader.IS_CHANGED(vae_file.name, "fp32"), str)
    assert vae_mod.StepVideoVAELoader.IS_CHANGED("missing.safetensors", "fp32") != \
        vae_mod.StepVideoVAELoader.IS_CHANGED("missing.safetensors", "fp32")  # NaN: always re-run


def test_decode_gives_comfy_images_matching_the_core(vae_mod, handle, vae_file):
    latents = torch.randn(1, 6, 8, 1, 2, generator=torch.Generator().manual_seed(0))  # core layout
    samples = {"samples": latents.transpose(1, 2).contiguous()}                    # LATENT [B, C, F, h, w]
    (images,) = vae_mod.StepVideoVAEDecode().decode(vae=handle, samples=samples)
    assert images.shape == (34, 16, 32, 3) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    expected = load_vae(vae_file).decode(latents)[0].permute(0, 2, 3, 1)
    assert torch.allclose(images, (expected + 1) / 2, atol=1e-6)


def test_decode_with_tiling_option(vae_mod, handle):
    samples = {"samples": torch.randn(1, 8, 3, 1, 3, generator=torch.Generator().manual_seed(1))}
    (untiled,) = vae_mod.StepVideoVAEDecode().decode(vae=handle, samples=samples)
    (tiled,) = vae_mod.StepVideoVAEDecode().decode(vae=handle, samples=samples, tile_size=2, tile_overlap=1)
    assert tiled.shape == untiled.shape == (17, 16, 48, 3)
    assert not torch.equal(tiled, untiled)


def test_encode_gives_a_comfy_latent(vae_mod, handle):
    images = torch.rand(17, 16, 32, 3, generator=torch.Generator().manual_seed(3))
    (latent,) = vae_mod.StepVideoVAEEncode().encode(vae=handle, images=images, mode="mean", seed=0)
    assert latent["samples"].shape == (1, 8, 3, 1, 2)
    core = handle.vae.encode(images.permute(0, 3, 1, 2)[None] * 2 - 1, sample=False)
    assert torch.equal(latent["samples"], core.transpose(1, 2))
    (a,) = vae_mod.StepVideoVAEEncode().encode(vae=handle, images=images, mode="sample", seed=5)
    (b,) = vae_mod.StepVideoVAEEncode().encode(vae=handle, images=images, mode="sample", seed=5)
    assert torch.equal(a["samples"], b["samples"]) and not torch.equal(a["samples"], latent["samples"])


def test_encode_refuses_wrong_frame_counts(vae_mod, handle):
    with pytest.raises(ValueError, match="got 20 frames; use 17 or 34"):
        vae_mod.StepVideoVAEEncode().encode(vae=handle, images=torch.zeros(20, 16, 16, 3), mode="mean", seed=0)


@pytest.fixture
def progress(bridge, monkeypatch):
    """Records the bridge's progress bars: ``updates`` gets ("new", total) and (value, total);
    ``on_update(value)`` (settable) runs after each update."""
    record = types.SimpleNamespace(updates=[], on_update=lambda value: None)

    class Bar:
        def __init__(self, total):
            record.updates.append(("new", total))

        def update_absolute(self, value, total=None, preview=None):
            record.updates.append((value, total))
            record.on_update(value)

    monkeypatch.setattr(bridge, "progress_bar", Bar)
    return record


def test_progress_per_chunk(vae_mod, handle, progress):
    samples = {"samples": torch.zeros(1, 8, 9, 1, 1)}
    vae_mod.StepVideoVAEDecode().decode(vae=handle, samples=samples)
    assert progress.updates == [("new", 3), (1, 3), (2, 3), (3, 3)]


def test_interrupt_between_chunks(vae_mod, handle, bridge, progress):
    progress.on_update = lambda value: value == 1 and bridge.request_interrupt()  # cancel after the first chunk
    with pytest.raises(bridge.StepVideoInterrupted):
        vae_mod.StepVideoVAEDecode().decode(vae=handle, samples={"samples": torch.zeros(1, 8, 9, 1, 1)})
    assert progress.updates == [("new", 3), (1, 3)] and not bridge.interrupt_requested()  # flag consumed


def test_interrupt_inside_a_chunk(vae_mod, handle, bridge, progress):
    """Cancel pressed while the first chunk decodes: the node stops inside it (before its next stage)."""
    stages_after = []
    mid = handle.vae.decoder.mid
    press = mid.block_1.register_forward_hook(lambda *_: bridge.request_interrupt())
    later = handle.vae.decoder.conv_out.register_forward_hook(lambda *_: stages_after.append(1))
    try:
        with pytest.raises(bridge.StepVideoInterrupted):
            vae_mod.StepVideoVAEDecode().decode(vae=handle, samples={"samples": torch.zeros(1, 8, 9, 1, 1)})
    finally:
        press.remove()
        later.remove()
    assert progress.updates == [("new", 3)] and stages_after == [] and not bridge.interrupt_requested()


def test_outside_comfyui_the_handle_has_no_patcher_and_the_vae_rests_home(vae_mod, handle):
    assert handle.patcher is None
    (images,) = vae_mod.StepVideoVAEDecode().decode(vae=handle, samples={"samples": torch.zeros(1, 8, 3, 1, 1)})
    assert images.shape == (17, 16, 16, 3) and handle.vae.device == handle.offload_device


def test_a_managed_vae_is_loaded_by_comfyui_not_moved_by_the_node(vae_mod, handle, bridge, monkeypatch):
    """With a patcher, the node asks ComfyUI to load it (every weight, plus working memory) and leaves it loaded."""
    import dataclasses

    modules = vae_mod.VAEModules(handle.vae)
    patcher = types.SimpleNamespace(model=modules, load_device=handle.device, offload_device=handle.offload_device)
    managed = dataclasses.replace(handle, device=torch.device("cuda", 0), patcher=patcher)
    calls, moves = [], []
    monkeypatch.setattr(bridge, "load_models", lambda p, memory_required=0, full=False:
                        calls.append((p, memory_required, full)))
    monkeypatch.setattr(handle.vae, "to", lambda *a, **k: moves.append(a))
    out = vae_mod.run_on_device(managed, lambda vae: "done")
    weights = sum(p.nbytes for p in handle.vae.parameters())
    assert out == "done" and calls == [([patcher], vae_mod.WORK_FACTOR * weights, True)] and moves == []
