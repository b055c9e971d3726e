"""Video sizes and seeded noise."""

import hashlib

import pytest
import torch

from stepvideo_core.sampling import SizeError, check_video_size, initial_noise, latent_shape, video_frames
from stepvideo_core.sampling.noise import cpu_standard_normal


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


def _sha256(t: torch.Tensor) -> str:
    """Digest of the tensor's bits (little-endian), so every bit of every value counts."""
    bits = t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()
    return hashlib.sha256(bits.astype(bits.dtype.newbyteorder("<")).tobytes()).hexdigest()


def test_noise_is_seeded_bf16_and_drawn_on_cpu():
    a = initial_noise((1, 3, 64, 2, 2), seed=1234)
    b = initial_noise((1, 3, 64, 2, 2), seed=1234)
    c = initial_noise((1, 3, 64, 2, 2), seed=1235)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)
    generator = torch.Generator().manual_seed(1234)
    expected = torch.randn((1, 3, 64, 2, 2), generator=generator, dtype=torch.float64).to(torch.bfloat16)
    assert torch.equal(a, expected)  # the recipe: CPU generator -> float64 -> bf16, whatever the target device
    assert initial_noise((2,), seed=2 ** 64 - 1).shape == (2,)  # ComfyUI's full seed range
    assert 0.8 < a.float().std() < 1.2


def test_noise_values_are_pinned():
    """The same bits on every machine, CPU code path and torch release: hard-coded, not re-derived.

    Made with torch 2.13; the same bits come out of torch 2.9.1, and of both under
    ATEN_CPU_CAPABILITY=default, avx2 and avx512.  A direct bf16 or float32 draw (what
    torch.randn gives without the float64 step) fails this at once.
    """
    noise = initial_noise((1, 3, 64, 4, 4), seed=1234)
    assert noise.flatten()[:8].tolist() == [-0.08837890625, 0.341796875, 0.412109375, 1.0078125,
                                            -0.11181640625, -0.59765625, -0.09814453125, -0.3515625]
    assert _sha256(noise) == "d1f87afceb65c15b4fadb03f132007cc4940d97dab1eef78fd1b3c2e368ba970"
    top = initial_noise((1, 3, 64, 4, 4), seed=2 ** 64 - 1)
    assert top.flatten()[:4].tolist() == [-1.984375, 1.2109375, -1.640625, -0.77734375]
    assert _sha256(top) == "b6fe7e55ad6db952e6793177fc51dca210335e5f56b96a010508b14d08319de7"
    fp32 = initial_noise((1, 3, 64, 4, 4), seed=1234, dtype=torch.float32)
    assert fp32.dtype == torch.float32 and torch.equal(fp32.to(torch.bfloat16), noise)
    assert _sha256(fp32) == "6ef2003a860bc170a4675536ba75c17411b093d5489aba0e3f326c7a19053ba5"


def test_cpu_standard_normal_is_the_float64_draw_rounded():
    draw = cpu_standard_normal((3, 17), torch.Generator().manual_seed(5), torch.float32)
    reference = torch.randn((3, 17), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert draw.dtype == torch.float32 and draw.device.type == "cpu"
    assert torch.equal(draw, reference.float())
    generator = torch.Generator().manual_seed(9)
    first, second = (cpu_standard_normal((4,), generator) for _ in range(2))
    assert not torch.equal(first, second)  # it advances the caller's generator
