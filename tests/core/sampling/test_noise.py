"""Video sizes and seeded noise."""

import pytest
import torch

from stepvideo_core.sampling import SizeError, check_video_size, initial_noise, latent_shape, video_frames


def test_official_latent_shapes():
    assert latent_shape(992, 544, 204) == (1, 36, 64, 34, 62)
    assert latent_shape(768, 768, 51, batch=2) == (2, 9, 64, 48, 48)
    assert latent_shape(16, 16, 17) == (1, 3, 64, 1, 1)
    assert video_frames(36) == 204


@pytest.mark.parametrize("size, message", [
    ((1000, 544, 204), "width must be a positive multiple of 16, got 1000 (nearest valid: 992 or 1008)"),
    ((992, 540, 204), "height must be a positive multiple of 16, got 540 (nearest valid: 528 or 544)"),
    ((992, 544, 200), "frames must be a positive multiple of 17, got 200 (nearest valid: 187 or 204)"),
    ((992, 544, 5), "frames must be a positive multiple of 17, got 5 (nearest valid: 17)"),
    ((0, 544, 17), "width must be a positive multiple of 16, got 0 (nearest valid: 16)"),
])
def test_invalid_sizes_name_the_nearest_valid_ones(size, message):
    with pytest.raises(SizeError) as err:
        check_video_size(*size)
    assert message in str(err.value)


def test_every_invalid_value_is_reported_at_once():
    with pytest.raises(SizeError) as err:
        latent_shape(1000, 540, 200)
    assert all(name in str(err.value) for name in ("width", "height", "frames"))
    with pytest.raises(SizeError, match="integer"):
        check_video_size(992.0, 544, 17)


def test_noise_is_seeded_bf16_and_drawn_on_cpu():
    a = initial_noise((1, 3, 64, 2, 2), seed=1234)
    b = initial_noise((1, 3, 64, 2, 2), seed=1234)
    c = initial_noise((1, 3, 64, 2, 2), seed=1235)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)
    expected = torch.randn((1, 3, 64, 2, 2), generator=torch.Generator().manual_seed(1234), dtype=torch.bfloat16)
    assert torch.equal(a, expected)  # the recipe is CPU generator -> bf16, whatever the target device
    assert initial_noise((2,), seed=2 ** 64 - 1).shape == (2,)  # ComfyUI's full seed range
    assert 0.8 < a.float().std() < 1.2
