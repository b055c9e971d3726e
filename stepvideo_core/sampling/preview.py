"""Latent previews: a linear map from the latent channels to RGB, fitted for the VAE in use.

Decoding a preview with the VAE every step would cost more than the step, so,
like ComfyUI's ``latent_rgb_factors``, a preview is ``rgb = latent @ W + b`` per
latent cell (one pixel per 16x16 patch).  ``W`` [C, 3] and ``b`` [3] are not
published for Step-Video, and the pack ships none (factors fitted from the
random-init tiny test VAE would say nothing about the real one):
:func:`fit_latent_rgb` obtains them by least squares from (latents, decoded
video) pairs of one VAE -- e.g. a few real clips encoded by the VAE, or the
latents and frames of a finished generation -- by averaging the frames down to
the latent grid (16x16 pixels, 17 frames -> 3 latent frames) and solving a
ridge-regularised linear regression; :func:`fit_from_vae` does it for whichever
VAE the user has, by encoding synthetic clips of smooth, drifting colour fields
(the colour content a preview has to show).  Without factors there is no
preview image (:func:`preview_frame` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latent @ weight + bias`` with rgb in [-1, 1] (the VAE's output range)."""

    weight: torch.Tensor  # [C, 3]
    bias: torch.Tensor    # [3]

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """[..., C, h, w] latents -> [..., h, w, 3] RGB in [0, 1]."""
        x = latents.float().movedim(-3, -1)
        rgb = x @ self.weight.float().to(x.device) + self.bias.float().to(x.device)
        return ((rgb.clamp(-1, 1) + 1) / 2).cpu()


def _video_on_latent_grid(video: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """[B, T, 3, H, W] frames averaged down to [B, frames, 3, height, width] (area resampling)."""
    b, t, c, h, w = video.shape
    x = video.float().permute(0, 2, 1, 3, 4)  # B, 3, T, H, W
    x = F.adaptive_avg_pool3d(x, (frames, height, width))
    return x.permute(0, 2, 1, 3, 4)


def fit_latent_rgb(latents: torch.Tensor, video: torch.Tensor, ridge: float = 1e-3) -> LatentRGB:
    """Least-squares factors mapping ``latents`` [B, F, C, h, w] to ``video`` [B, T, 3, H, W] in [-1, 1].

    The video is the decode of (or the clip encoded into) the latents; it is
    averaged down to the latent grid first.  ``ridge`` (relative to the mean
    channel energy) keeps the fit stable when some channels hardly vary.
    """
    if latents.ndim != 5 or video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"expected latents [B, F, C, h, w] and video [B, T, 3, H, W], got "
                         f"{list(latents.shape)} and {list(video.shape)}")
    b, f, c, h, w = latents.shape
    target = _video_on_latent_grid(video, f, h, w).movedim(2, -1).reshape(-1, 3).double()
    x = latents.double().movedim(2, -1).reshape(-1, c)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # bias column
    gram = x.T @ x
    reg = ridge * gram.diagonal()[:c].mean().clamp_min(1e-12)
    gram[:c, :c] += reg * torch.eye(c, dtype=gram.dtype)
    solution = torch.linalg.solve(gram, x.T @ target)
    return LatentRGB(solution[:c].float(), solution[c].float())


def synthetic_clips(count: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``count`` clips [count, 17, 3, size, size] in [-1, 1]: smooth random colour fields that drift
    over the 17 frames (bilinearly upsampled 4x4 colour grids, interpolated in time)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand(count, 3, 4, 4, generator=gen) * 2 - 1
    end = torch.rand(count, 3, 4, 4, generator=gen) * 2 - 1
    t = torch.linspace(0, 1, 17).view(1, 17, 1, 1, 1)
    grids = (1 - t) * start[:, None] + t * end[:, None]  # [count, 17, 3, 4, 4]
    frames = F.interpolate(grids.reshape(count * 17, 3, 4, 4), size=(size, size), mode="bilinear",
                           align_corners=True)
    return frames.reshape(count, 17, 3, size, size)


@torch.no_grad()
def fit_from_vae(vae, count: int = 4, size: int = 64, seed: int = 0) -> LatentRGB:
    """Preview factors for ``vae`` (an object with ``encode(video, sample=False)``), fitted on
    :func:`synthetic_clips`; one encoder pass over ``count`` small 17-frame clips."""
    clips = synthetic_clips(count, size, seed)
    latents = torch.cat([vae.encode(clip[None], sample=False).float().cpu() for clip in clips])
    return fit_latent_rgb(latents, clips)


def preview_frame(latents: torch.Tensor, factors: Optional[LatentRGB] = None,
                  index: Optional[int] = None) -> Optional[torch.Tensor]:
    """Return uint8 RGB [h, w, 3] of one latent frame (the middle one by default) of ``latents`` [B, F, C, h, w].

    Returns None -- no preview image, and nothing computed -- without ``factors`` or with factors
    fitted for another number of latent channels (a VAE that does not match the model).
    """
    if factors is None or factors.weight.shape[0] != latents.shape[2]:
        return None
    frame = latents[0, latents.shape[1] // 2 if index is None else index]
    return (factors.apply(frame) * 255).round().to(torch.uint8)
