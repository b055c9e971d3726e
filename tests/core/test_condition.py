"""The TI2V image condition against the official pipeline (fixture made by its code) and the image readers.

Tolerances: max relative error max|ours - official| / max|official| <= 1e-5 (fp32), for the resized
crop and for the condition (the posterior sample drawn from the global RNG seeded as the fixture's
metadata says).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from stepvideo_core import load_vae
from stepvideo_core.condition import (ImageConditionError, covering_size, image_condition, image_from_comfy,
                                      image_from_file, resize_and_crop)
from tests.factory import write_tiny_vae
from tests.oracle import OracleFixture, rel_err

TOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    return OracleFixture("stepvideo_ti2v_condition.safetensors")


@pytest.fixture(scope="module")
def vae(fixture, tmp_path_factory):
    return load_vae(write_tiny_vae(tmp_path_factory.mktemp("ti2v_vae"), layout="single",
                                   state_dict=fixture.state_dict), dtype=torch.float32)


def target(fixture):
    height, width = fixture.meta["target_hw"]
    return height, width


def test_resize_and_crop_matches_the_official(fixture):
    height, width = target(fixture)
    resized = resize_and_crop(fixture.inputs["image"], height, width)
    ref = fixture.outputs["resized"][0]
    assert resized.shape == ref.shape == (3, height, width)
    assert rel_err(resized, ref) <= TOL


def test_image_latent_mean_matches_the_official_moments(fixture, vae):
    height, width = target(fixture)
    crop = resize_and_crop(fixture.inputs["image"], height, width)[None]
    mean = vae.encode_image(crop, sample=False)
    ref = fixture.outputs["image_moments"][:, :, :vae.config.z_channels]
    assert mean.shape == ref.shape == (1, 1, 8, 2, 3)
    assert rel_err(mean, ref) <= TOL


def test_condition_matches_the_official_with_its_seed(fixture, vae):
    height, width = target(fixture)
    torch.manual_seed(fixture.meta["seed"] + 2)  # what the fixture ran before the official encode
    cond = image_condition(vae, fixture.inputs["image"], width=width, height=height,
                           frames=fixture.meta["num_frames"])
    ref = fixture.outputs["condition_hidden_states"]
    half = ref.shape[0] // 2  # the official repeats the condition for the two CFG branches
    assert torch.equal(ref[:half], ref[half:])
    assert cond.shape == ref[:half].shape == (1, 3, 8, 2, 3)
    assert rel_err(cond, ref[:half]) <= TOL
    assert torch.count_nonzero(cond[:, 1:]) == 0  # only the first latent frame carries the image


def test_seeded_condition_is_the_machine_independent_draw(fixture, vae):
    height, width = target(fixture)
    kw = dict(width=width, height=height, frames=34, batch=2)
    a = image_condition(vae, fixture.inputs["image"], generator=torch.Generator().manual_seed(5), **kw)
    b = image_condition(vae, fixture.inputs["image"], generator=torch.Generator().manual_seed(5), **kw)
    mean = image_condition(vae, fixture.inputs["image"], sample=False, **kw)
    assert a.shape == (2, 6, 8, 2, 3) and torch.equal(a, b) and torch.equal(a[0], a[1])
    assert not torch.equal(a, mean) and torch.count_nonzero(mean[:, 1:]) == 0


@pytest.mark.parametrize("image_hw, target_hw, covered", [
    ((40, 90), (32, 48), (32, 72)),     # wider than the target: height-driven
    ((90, 40), (32, 48), (108, 48)),    # narrower: width-driven
    ((544, 992), (544, 992), (544, 992)),
    ((1, 1), (32, 48), (48, 48)),       # a single pixel covers the target as a square
    ((333, 500), (544, 992), (661, 992)),  # 333 * 992 / 500 = 660.67 rounds to 661
])
def test_covering_size(image_hw, target_hw, covered):
    assert covering_size(*image_hw, *target_hw) == covered


def test_a_one_pixel_image_gives_a_uniform_crop():
    image = torch.tensor([0.25, -0.5, 1.0]).view(3, 1, 1)
    crop = resize_and_crop(image, 32, 48)
    assert crop.shape == (3, 32, 48)
    torch.testing.assert_close(crop, image.expand(3, 32, 48))


def test_comfy_images_of_every_channel_count():
    rgb = torch.rand(2, 5, 7, 3, generator=torch.Generator().manual_seed(0))
    image = image_from_comfy(rgb)
    assert image.shape == (3, 5, 7) and torch.equal(image, rgb[0].permute(2, 0, 1) * 2 - 1)
    rgba = torch.cat([rgb, torch.zeros(2, 5, 7, 1)], dim=-1)
    assert torch.equal(image_from_comfy(rgba), image)  # alpha dropped, as convert('RGB')
    grey = rgb[..., :1]
    assert torch.equal(image_from_comfy(grey), (grey[0].permute(2, 0, 1) * 2 - 1).expand(3, 5, 7))
    assert torch.equal(image_from_comfy(rgb, index=1), rgb[1].permute(2, 0, 1) * 2 - 1)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(0, 4, 4, 3), "holds no frames"),
    (torch.zeros(1, 4, 4, 2), "1, 3 or 4 channels"),
    (torch.zeros(4, 4), "expected an IMAGE"),
    (torch.full((1, 4, 4, 3), float("nan")), "NaN/Inf"),
    (torch.zeros(1, 0, 4, 3), "empty"),
])
def test_bad_comfy_images_are_named(images, message):
    with pytest.raises(ImageConditionError, match=message):
        image_from_comfy(images)


def test_image_files_of_every_common_mode(tmp_path):
    rgb = (np.arange(4 * 6 * 3) % 256).astype(np.uint8).reshape(4, 6, 3)
    expected = torch.from_numpy(rgb.astype(np.float64) / 255.0).float().permute(2, 0, 1) * 2 - 1
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert torch.equal(image_from_file(tmp_path / "rgb.png"), expected)
    Image.fromarray(np.dstack([rgb, np.full((4, 6), 7, np.uint8)])).save(tmp_path / "rgba.png")
    assert torch.equal(image_from_file(tmp_path / "rgba.png"), expected)
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    grey_expected = (torch.from_numpy(grey.astype(np.float64) / 255.0).float() * 2 - 1).expand(3, 4, 6)
    assert torch.equal(image_from_file(tmp_path / "grey.png"), grey_expected)
    deep = (np.arange(4 * 6, dtype=np.uint16) * 2731).reshape(4, 6)  # up to 62813 of 65535
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    deep_expected = (torch.from_numpy(deep.astype(np.float64) / 65535.0).float() * 2 - 1).expand(3, 4, 6)
    torch.testing.assert_close(image_from_file(tmp_path / "deep.png"), deep_expected, rtol=0, atol=1e-6)


def test_unreadable_image_files_are_named(tmp_path):
    with pytest.raises(ImageConditionError, match="not found"):
        image_from_file(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageConditionError, match="not an image Pillow can read"):
        image_from_file(tmp_path / "text.png")


def test_condition_refuses_bad_sizes_and_images(fixture, vae):
    with pytest.raises(ValueError, match="frames must be a positive multiple of 17"):
        image_condition(vae, fixture.inputs["image"], width=48, height=32, frames=20)
    with pytest.raises(ImageConditionError, match="RGB \\[3, height, width\\]"):
        image_condition(vae, torch.zeros(4, 8, 8), width=48, height=32, frames=17)
