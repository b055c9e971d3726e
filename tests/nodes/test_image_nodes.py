"""The image-to-video nodes outside ComfyUI: StepVideo Image to Video gives the core's image condition for
a ComfyUI IMAGE, StepVideo Sampler passes it (and the motion score) to the core sampler and refuses graphs
that cannot be what the user meant, and the text nodes offer the TI2V prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from stepvideo_core.condition import image_condition, image_from_comfy, image_noise_generator
from stepvideo_core.text.encoder import NEGATIVE_PROMPT, POSITIVE_MAGIC, TI2V_MAGIC, TI2V_NEGATIVE_PROMPT
from stepvideo_core.tiny import TINY_TI2V_DIT_CONFIG, write_tiny_vae
from tests.core.sampling.conftest import conditioning, tiny_model

SIZE = dict(width=32, height=48, frames=17)


@pytest.fixture
def image_mod(pack, bridge):
    return sys.modules[f"{pack.__name__}.nodes.image"]


@pytest.fixture
def text_mod(pack, bridge):
    return sys.modules[f"{pack.__name__}.nodes.text"]


@pytest.fixture
def vae_handle(pack, bridge, models_dir):
    vae_mod = sys.modules[f"{pack.__name__}.nodes.vae"]
    path = write_tiny_vae(models_dir / "vae", layout="single", seed=2)
    return vae_mod.StepVideoVAELoader().load(vae_name=path.name, weight_dtype="fp32")["result"][0]


def comfy_image(seed=1, height=40, width=60):
    """A ComfyUI IMAGE [1, H, W, 3] in [0, 1]."""
    return torch.rand((1, height, width, 3), generator=torch.Generator().manual_seed(seed))


def test_image_to_video_is_the_core_condition_of_the_first_frame(image_mod, vae_handle):
    images = torch.cat([comfy_image(1), comfy_image(2)])  # a batch: the first image is used
    out = image_mod.StepVideoImageToVideo().encode(vae=vae_handle, image=images, **SIZE, motion_score=7.5, seed=11)
    (cond,) = out["result"]
    expected = image_condition(vae_handle.vae, image_from_comfy(images[:1]), **SIZE,
                               generator=image_noise_generator(11))
    assert torch.equal(cond.latent, expected)
    assert cond.latent.shape == (1, 3, 8, 3, 2) and bool(cond.latent[:, 1:].eq(0).all())
    assert (cond.width, cond.height, cond.frames, cond.motion_score) == (32, 48, 17, 7.5)
    assert "motion score 7.5" in out["ui"]["text"][0]
    # the seed draws the posterior sample; the second image is ignored
    other = image_mod.StepVideoImageToVideo().encode(vae=vae_handle, image=images, **SIZE, motion_score=7.5, seed=12)
    assert not torch.equal(other["result"][0].latent, cond.latent)
    first_only = image_mod.StepVideoImageToVideo().encode(vae=vae_handle, image=images[:1], **SIZE,
                                                          motion_score=7.5, seed=11)
    assert torch.equal(first_only["result"][0].latent, cond.latent)


@pytest.mark.parametrize("change, message", [(dict(frames=20), "nearest valid"),
                                             (dict(motion_score=float("nan")), "motion_score must be a finite"),
                                             (dict(image=torch.zeros(0, 8, 8, 3)), "holds no frames")])
def test_image_to_video_refuses_bad_inputs(image_mod, vae_handle, change, message):
    args = dict(vae=vae_handle, image=comfy_image(), **SIZE, motion_score=5.0, seed=1)
    with pytest.raises(ValueError, match=message):
        image_mod.StepVideoImageToVideo().encode(**dict(args, **change))


@pytest.fixture(scope="module")
def ti2v_dit(one_thread):
    return tiny_model(torch.float32, config=TINY_TI2V_DIT_CONFIG)


def handle_of(types_mod, dit):
    return types_mod.StepVideoModelHandle(transformer=dit, dtype=torch.float32, device=torch.device("cpu"),
                                          offload_device=torch.device("cpu"), attention="sdpa", source=Path("tiny"))


def run(sampler_mod, model, image_condition=None, **size):
    size = dict(SIZE, **size)
    return sampler_mod.StepVideoSampler().sample(model=model, positive=conditioning(1), negative=conditioning(2),
                                                 preset="Step-Video-TI2V", **size, steps=2, cfg=9.0, shift=13.0,
                                                 seed=3, image_condition=image_condition)


def condition_of(types_mod, motion=5.0, seed=4, **size):
    size = dict(SIZE, **size)
    latent = torch.zeros(1, size["frames"] // 17 * 3, 64, size["height"] // 16, size["width"] // 16)
    latent[:, :1] = torch.randn(latent[:, :1].shape, generator=torch.Generator().manual_seed(seed))
    return types_mod.StepVideoImageCondition(latent, size["width"], size["height"], size["frames"], motion)


def test_sampler_passes_the_condition_and_motion_score_to_the_core(pack, sampler_mod, types_mod, ti2v_dit,
                                                                   sample_calls):
    from stepvideo_core import SamplingSettings, sample

    cond = condition_of(types_mod, motion=6.5)
    out = run(sampler_mod, handle_of(types_mod, ti2v_dit), cond)
    (call,) = sample_calls
    assert call["condition"] is cond.latent and call["motion_score"] == 6.5
    assert "image-to-video, motion score 6.5" in out["ui"]["text"][0]
    expected = sample(ti2v_dit, conditioning(1), conditioning(2),
                      settings=SamplingSettings(**SIZE, steps=2, cfg=9.0, shift=13.0, seed=3, motion_score=6.5),
                      condition=cond.latent)
    assert torch.equal(out["result"][0]["samples"], expected.movedim(1, 2))


def test_sampler_refuses_a_ti2v_model_without_an_image(sampler_mod, types_mod, ti2v_dit):
    with pytest.raises(ValueError, match="connect StepVideo Image to Video"):
        run(sampler_mod, handle_of(types_mod, ti2v_dit))


def test_sampler_refuses_an_image_for_a_t2v_model(sampler_mod, types_mod, dit):
    with pytest.raises(ValueError, match="the model is Step-Video-T2V"):
        run(sampler_mod, handle_of(types_mod, dit), condition_of(types_mod))


def test_sampler_refuses_a_condition_made_for_another_size(sampler_mod, types_mod, ti2v_dit):
    with pytest.raises(ValueError, match=r"made for 32x48x34 .* set to 32x48x17"):
        run(sampler_mod, handle_of(types_mod, ti2v_dit), condition_of(types_mod, frames=34))


def test_text_nodes_offer_the_ti2v_prompts(text_mod):
    assert text_mod.positive_text("a cat", True, "Step-Video-TI2V") == "a cat" + TI2V_MAGIC
    assert text_mod.positive_text("a cat", True) == "a cat" + POSITIVE_MAGIC
    assert text_mod.positive_text("a cat", False, "Step-Video-TI2V") == "a cat"
    assert text_mod.negative_text("blurry") == "blurry"
    assert text_mod.negative_text("blurry", "Step-Video-TI2V") == TI2V_NEGATIVE_PROMPT
    assert text_mod.negative_text("blurry", "Step-Video-T2V") == NEGATIVE_PROMPT
    spec = text_mod.StepVideoTextEncode.INPUT_TYPES()
    assert "magic" in spec["optional"] and "magic" not in spec["required"]  # old API workflows still validate
    assert "official" in text_mod.StepVideoNegativeTextEncode.INPUT_TYPES()["optional"]
    with pytest.raises(ValueError, match="unknown magic"):
        text_mod.positive_text("a", True, "Step-Video-X")


def test_the_encode_nodes_encode_the_chosen_text(text_mod, monkeypatch):
    seen = []
    monkeypatch.setattr(text_mod, "encode_prompt", lambda encoder, text: seen.append(text) or {"result": (text,)})
    text_mod.StepVideoTextEncode().encode(text_encoder=None, prompt="a cat", add_magic=True, magic="Step-Video-TI2V")
    text_mod.StepVideoNegativeTextEncode().encode(text_encoder=None, prompt="x", official="Step-Video-TI2V")
    text_mod.StepVideoTextEncode().encode(text_encoder=None, prompt="a cat", add_magic=True)  # as saved before
    assert seen == ["a cat" + TI2V_MAGIC, TI2V_NEGATIVE_PROMPT, "a cat" + POSITIVE_MAGIC]
