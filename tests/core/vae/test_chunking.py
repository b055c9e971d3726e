"""Chunked encode/decode: whole calls equal chunk-by-chunk work, callbacks, interrupts, input checks."""

import pytest
import torch

from stepvideo_core.sampling.noise import cpu_standard_normal
from stepvideo_core.vae import VAEInterrupted, from_comfy_latent, to_comfy_latent
from stepvideo_core.vae.model import blend_seam


def official_mix(x: torch.Tensor) -> torch.Tensor:
    """The seam blend written the way the official ``mix`` does it (strided slices, back first)."""
    x = x.clone()
    front = slice(16, x.size(1) - 1, 17)
    back = slice(17, x.size(1), 17)
    x[:, back] = x[:, back] * 0.6 + x[:, front] * 0.4
    x[:, front] = x[:, front] * 0.6 + x[:, back] * 0.4
    return x


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 12, 8, 1, 2, generator=torch.Generator().manual_seed(1))  # 4 chunks, batch 2


@pytest.fixture(scope="module")
def video():
    return torch.rand(1, 51, 3, 16, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1  # 3 chunks


def test_decode_equals_chunks_then_official_blend(tiny_vae, latents):
    chunks = torch.cat([tiny_vae.decode_chunk(c) for c in latents.split(3, dim=1)], dim=1)
    assert chunks.shape == (2, 68, 3, 16, 32)
    expected = official_mix(chunks)
    assert torch.equal(tiny_vae.decode(latents, clamp=False), expected)
    assert torch.equal(tiny_vae.decode(latents), expected.clamp(-1, 1))


def test_batch_items_are_independent(tiny_vae, latents):
    whole = tiny_vae.decode(latents[:, :6], clamp=False)
    single = tiny_vae.decode(latents[1:, :6], clamp=False)
    assert ((whole[1:] - single).abs().max() / single.abs().max()).item() <= 1e-5  # kernels differ by batch size


def test_seam_blend_order_is_back_first():
    x = torch.zeros(1, 34, 1)
    x[:, 17:] = 1.0  # front frame (16) = 0, back frame (17) = 1
    blend_seam(x, 17)
    assert x[0, 17, 0].item() == pytest.approx(0.6)          # 0.6 * 1 + 0.4 * 0
    assert x[0, 16, 0].item() == pytest.approx(0.4 * 0.6)    # uses the *updated* back (not 0.4)
    assert x[0, 15, 0].item() == 0 and x[0, 18, 0].item() == 1


def test_encode_mean_equals_chunk_means(tiny_vae, video):
    means = torch.cat([tiny_vae.encode_chunk(c).chunk(2, dim=2)[0] for c in video.split(17, dim=1)], dim=1)
    assert torch.equal(tiny_vae.encode(video, sample=False), means)


def test_encode_sample_draws_the_whole_noise_at_once(tiny_vae, video):
    """With a CPU generator the noise is the machine-independent draw of the sampler's seeds."""
    moments = torch.cat([tiny_vae.encode_chunk(c) for c in video.split(17, dim=1)], dim=1)
    mean, logvar = moments.chunk(2, dim=2)
    noise = cpu_standard_normal(mean.shape, torch.Generator().manual_seed(7))
    expected = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
    sample = tiny_vae.encode(video, generator=torch.Generator().manual_seed(7))
    assert sample.shape == (1, 9, 8, 1, 2)
    assert torch.equal(sample, expected)


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_on_chunk_is_called_once_per_chunk(tiny_vae, latents, video, direction):
    calls = []
    if direction == "encode":
        tiny_vae.encode(video, sample=False, on_chunk=lambda i, n: calls.append((i, n)))
        assert calls == [(1, 3), (2, 3), (3, 3)]
    else:
        tiny_vae.decode(latents, on_chunk=lambda i, n: calls.append((i, n)))
        assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_should_stop_interrupts_between_chunks(tiny_vae, latents, video, direction):
    done, asked = [], []

    def should_stop():
        asked.append(len(done))
        return len(done) == 2

    run = (lambda **kw: tiny_vae.encode(video, **kw)) if direction == "encode" else \
        (lambda **kw: tiny_vae.decode(latents, **kw))
    with pytest.raises(VAEInterrupted, match=f"{direction} stopped on request after 2 of") as err:
        run(on_chunk=lambda i, n: done.append(i), should_stop=should_stop)
    assert isinstance(err.value, InterruptedError)
    # polled before each chunk and before every stage inside it; the first poll after chunk 2 stopped it
    assert done == [1, 2] and asked[0] == 0 and asked.count(2) == 1 and asked[-1] == 2
    assert asked.count(0) > 1 and asked.count(1) > 1


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_should_stop_interrupts_inside_a_chunk(tiny_vae, latents, video, direction):
    """A stop asked while a chunk runs lands before the next stage, not after the chunk (seconds on a GPU)."""
    coder = tiny_vae.encoder if direction == "encode" else tiny_vae.decoder
    reference = tiny_vae.encode(video, sample=False) if direction == "encode" else tiny_vae.decode(latents)
    polls, last_stage_runs = [], []
    hook = coder.conv_out.register_forward_hook(lambda *_: last_stage_runs.append(1))

    def stop_on_third_poll():  # poll 1 = before chunk 1, polls 2.. = before its stages
        polls.append(1)
        return len(polls) >= 3

    run = (lambda **kw: tiny_vae.encode(video, sample=False, **kw)) if direction == "encode" else \
        (lambda **kw: tiny_vae.decode(latents, **kw))
    try:
        with pytest.raises(VAEInterrupted, match=f"{direction} stopped on request inside chunk 1 of"):
            run(on_chunk=lambda i, n: pytest.fail("no chunk may finish"), should_stop=stop_on_third_poll)
    finally:
        hook.remove()
    assert len(polls) == 3 and last_stage_runs == []
    # nothing is left attached, and the model gives the same result as before
    assert not any(m._forward_pre_hooks for m in tiny_vae.modules())
    again = tiny_vae.encode(video, sample=False) if direction == "encode" else tiny_vae.decode(latents)
    assert torch.equal(again, reference)


def test_output_device_and_dtype(tiny_vae, latents):
    out = tiny_vae.decode(latents[:, :3], output_device="cpu")
    assert out.device.type == "cpu" and out.dtype == tiny_vae.compute_dtype


@pytest.mark.parametrize("frames, hint", [(40, "got 40 frames; use 34 or 51"), (16, "got 16 frames; use 17"),
                                          (18, "got 18 frames; use 17 or 34")])
def test_encode_refuses_frame_counts_with_nearest_valid(tiny_vae, frames, hint):
    with pytest.raises(ValueError, match=hint):
        tiny_vae.encode(torch.zeros(1, frames, 3, 16, 16))


@pytest.mark.parametrize("size, hint", [((40, 16), "height 40 is not a multiple of 16; use 32 or 48"),
                                        ((16, 8), "width 8 is not a multiple of 16; use 16")])
def test_encode_refuses_sizes_with_nearest_valid(tiny_vae, size, hint):
    with pytest.raises(ValueError, match=hint):
        tiny_vae.encode(torch.zeros(1, 17, 3, *size))


def test_decode_refuses_latent_frame_counts_and_layouts(tiny_vae):
    with pytest.raises(ValueError, match="got 7 latent frames; use 6 or 9"):
        tiny_vae.decode(torch.zeros(1, 7, 8, 1, 1))
    with pytest.raises(ValueError, match="got 2 latent frames; use 3"):
        tiny_vae.decode(torch.zeros(1, 2, 8, 1, 1))
    with pytest.raises(ValueError, match="look like \\[B, C, F, h, w\\]; convert with from_comfy_latent"):
        tiny_vae.decode(torch.zeros(1, 8, 6, 1, 1))
    with pytest.raises(ValueError, match="exactly 3 latent frames"):
        tiny_vae.decode_chunk(torch.zeros(1, 6, 8, 1, 1))
    with pytest.raises(ValueError, match="exactly 17 frames"):
        tiny_vae.encode_chunk(torch.zeros(1, 34, 3, 16, 16))


def test_comfy_latent_layout_round_trip():
    x = torch.randn(2, 6, 8, 3, 4)
    comfy = to_comfy_latent(x)
    assert comfy.shape == (2, 8, 6, 3, 4) and comfy.is_contiguous()
    assert torch.equal(comfy[:, :, 5], x[:, 5])
    assert torch.equal(from_comfy_latent(comfy), x)
    with pytest.raises(ValueError, match="video LATENT"):
        from_comfy_latent(torch.zeros(1, 8, 3, 4))
