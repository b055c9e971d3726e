"""Video sizes, latent shapes and seeded initial noise.

Sizes follow the official pipeline: width and height are multiples of 16 (the
VAE compresses 16x in space), frames a multiple of 17 (the VAE turns every 17
frames into 3 latent frames).  Unlike the official ``check_inputs`` (which
silently rounds down), invalid values are refused with the nearest valid ones
named, so a graph never renders a different size than the one asked for.
"""

from __future__ import annotations

from typing import Union

import torch

SPATIAL_FACTOR = 16     # pixels per latent cell (VAE v2)
FRAME_CHUNK = 17        # video frames per VAE chunk
LATENTS_PER_CHUNK = 3   # latent frames per VAE chunk
NOISE_DTYPE = torch.bfloat16  # the official pipeline draws its noise in bf16


class SizeError(ValueError):
    """A width, height or frame count that the model cannot produce."""


def _nearest(value: int, step: int, minimum: int) -> list[int]:
    """The valid values (multiples of ``step``, at least ``minimum``) closest to ``value``, ascending."""
    below = max(minimum, (value // step) * step)
    above = max(minimum, -(-value // step) * step)
    return sorted({below, above})


def check_video_size(width: int, height: int, frames: int) -> None:
    """Raise :class:`SizeError` naming every invalid value and its nearest valid ones; else return None."""
    problems = []
    for name, value, step in (("width", width, SPATIAL_FACTOR), ("height", height, SPATIAL_FACTOR),
                              ("frames", frames, FRAME_CHUNK)):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} must be an integer, got {value!r}")
        elif value < step or value % step:
            options = " or ".join(str(v) for v in _nearest(value, step, step))
            problems.append(f"{name} must be a positive multiple of {step}, got {value} (nearest valid: {options})")
    if problems:
        raise SizeError("invalid video size: " + "; ".join(problems))


def latent_shape(width: int, height: int, frames: int, batch: int = 1, channels: int = 64) -> tuple:
    """Official latent shape ``(B, frames/17*3, channels, height/16, width/16)`` after checking the size."""
    check_video_size(width, height, frames)
    return (int(batch), frames // FRAME_CHUNK * LATENTS_PER_CHUNK, int(channels),
            height // SPATIAL_FACTOR, width // SPATIAL_FACTOR)


def video_frames(latent_frames: int) -> int:
    """Video frames the VAE decodes from ``latent_frames`` latent frames (a multiple of 3)."""
    return latent_frames // LATENTS_PER_CHUNK * FRAME_CHUNK


def initial_noise(shape: tuple, seed: int, device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = NOISE_DTYPE) -> torch.Tensor:
    """Standard normal noise of ``shape`` for ``seed``, identical on every machine.

    The values are drawn on the CPU by a ``torch.Generator`` seeded with ``seed``
    (Philox/MT streams differ between CPU and CUDA, so drawing on the compute
    device would make a seed mean different videos on different GPUs), in
    ``dtype`` (bf16 like the official pipeline), and only then moved to ``device``.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    noise = torch.randn(tuple(shape), generator=generator, dtype=dtype, device="cpu")
    return noise.to(device)
