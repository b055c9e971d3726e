"""Latent previews: least-squares RGB factors, and no preview image without factors that fit."""

import torch
import torch.nn.functional as F

from stepvideo_core.sampling.preview import LatentRGB, fit_latent_rgb, preview_frame


def synthetic_pair(seed=0, channels=8):
    """Latents and a 'decoded' video that really is a linear function of them (16x upsampled in space, 3x in time)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 6, channels, 3, 4, generator=gen)
    weight = torch.randn(channels, 3, generator=gen) * 0.2
    bias = torch.tensor([0.1, -0.2, 0.05])
    rgb = latents.movedim(2, -1) @ weight + bias                      # [1, 6, 3, 4, 3]
    video = rgb.permute(0, 4, 1, 2, 3)                                 # [1, 3, 6, 3, 4]
    video = F.interpolate(video, size=(18, 48, 64), mode="nearest")    # frames x3, pixels x16
    return latents, video.permute(0, 2, 1, 3, 4), weight, bias


def test_fit_recovers_a_linear_decoder():
    latents, video, weight, bias = synthetic_pair()
    fit = fit_latent_rgb(latents, video, ridge=1e-9)
    assert torch.allclose(fit.weight, weight, atol=2e-3) and torch.allclose(fit.bias, bias, atol=2e-3)
    rgb = fit.apply(latents[0])
    assert rgb.shape == (6, 3, 4, 3) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1


def test_preview_frame_needs_factors_for_these_channels():
    latents = torch.randn(1, 9, 64, 5, 7, generator=torch.Generator().manual_seed(1))
    factors = LatentRGB(torch.zeros(64, 3), torch.tensor([1.0, -1.0, 0.0]))
    frame = preview_frame(latents, factors)
    assert frame.dtype == torch.uint8 and frame.shape == (5, 7, 3) and frame[0, 0].tolist() == [255, 0, 128]
    red = LatentRGB(torch.zeros(64, 3).index_fill_(1, torch.tensor([0]), 0.1), torch.zeros(3))
    assert torch.equal(preview_frame(latents, red), preview_frame(latents[:, 4:5], red))  # the middle frame
    assert not torch.equal(preview_frame(latents, red), preview_frame(latents, red, index=0))
    assert preview_frame(latents) is None  # no factors: no image (never a grey stand-in)
    assert preview_frame(latents, LatentRGB(torch.zeros(8, 3), torch.zeros(3))) is None  # fitted for 8 channels


class LinearVAE:
    """A stand-in VAE whose latents are a fixed linear map of the 16x16-pooled frames."""

    def __init__(self, channels=8):
        self.map = torch.randn(3, channels, generator=torch.Generator().manual_seed(5))

    def encode(self, video, sample=False):
        b, t, _, h, w = video.shape
        pooled = F.adaptive_avg_pool3d(video.permute(0, 2, 1, 3, 4), (t // 17 * 3, h // 16, w // 16))
        return (pooled.permute(0, 2, 3, 4, 1) @ self.map).permute(0, 1, 4, 2, 3)


def test_fit_from_vae_previews_unseen_clips_in_their_colours():
    from stepvideo_core.sampling.preview import fit_from_vae, synthetic_clips
    vae = LinearVAE()
    fit = fit_from_vae(vae, count=3, size=32, seed=0)
    clip = synthetic_clips(1, 32, seed=9)                      # not among the fitted clips
    latents = vae.encode(clip)
    rgb = fit.apply(latents[0])                                 # [F, h, w, 3] in [0, 1]
    truth = (F.adaptive_avg_pool3d(clip.permute(0, 2, 1, 3, 4), (3, 2, 2)).permute(0, 2, 3, 4, 1)[0] + 1) / 2
    assert (rgb - truth).abs().max() < 1e-3


def test_synthetic_clips_are_smooth_colour_fields_in_range():
    from stepvideo_core.sampling.preview import synthetic_clips
    clips = synthetic_clips(2, 48, seed=1)
    assert clips.shape == (2, 17, 3, 48, 48) and clips.min() >= -1 and clips.max() <= 1
    assert (clips[:, :, :, :, 1:] - clips[:, :, :, :, :-1]).abs().max() < 0.2   # no hard edges
    assert not torch.equal(clips[:, 0], clips[:, -1])                            # colours drift in time
