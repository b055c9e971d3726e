"""Video sizes, latent shapes and seeded initial noise (the same on every machine).

Sizes follow the official pipeline: width and height are multiples of 16 (the
VAE compresses 16x in space), frames a multiple of 17 (the VAE turns every 17
frames into 3 latent frames).  Unlike the official ``check_inputs`` (which
silently rounds down), invalid values are refused with the nearest valid ones
named, so a graph never renders a different size than the one asked for.
"""

from __future__ import annotations

from typing import Union

import torch

from ..vae.config import FRAME_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR

NOISE_DTYPE = torch.bfloat16  # the dtype the official pipeline's noise has (bf16)


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


def cpu_standard_normal(shape: tuple, generator: torch.Generator,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal values of ``shape`` in ``dtype`` from the CPU ``generator``: drawn in
    float64, then rounded to ``dtype`` (a CPU tensor).

    Why float64: PyTorch's CPU ``randn`` in float32 and bf16 is not the same stream of
    values everywhere.  Its float32 path uses a vectorised Box-Muller with polynomial
    log/sin/cos when the CPU kernel is built for AVX2/AVX-512 and libm otherwise, so
    the same seed gives different last bits on different code paths (measured, torch
    2.13: 383,904 of 1,000,003 fp32 values differ between ATEN_CPU_CAPABILITY=default
    and avx2, and 104 still differ after rounding to bf16); and the bf16 path changed
    between releases (torch 2.9.1 and 2.13 give entirely different bf16 noise for seed
    1234, and torch 2.13's bf16 draw itself differs between default and avx2).  The
    float64 path is plain scalar Box-Muller on every capability; checked: bit-identical
    float64 (and so bf16) values under torch 2.9.1 and 2.13, each with
    ATEN_CPU_CAPABILITY=default, avx2 and avx512.  A last-bit difference in a float64
    value (e.g. from another libm) would practically never survive the rounding to bf16
    or fp32.
    """
    if torch.device(generator.device).type != "cpu":
        raise ValueError(f"cpu_standard_normal needs a CPU generator, got one on {generator.device}")
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64, device="cpu").to(dtype)


def initial_noise(shape: tuple, seed: int, device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = NOISE_DTYPE) -> torch.Tensor:
    """Standard normal noise of ``shape`` for ``seed``, the same values on every machine.

    Drawn on the CPU by a ``torch.Generator`` seeded with ``seed`` (ComfyUI's range, up to
    2**64 - 1; CPU and CUDA generators give different streams, so drawing on the compute
    device would make a seed mean different noise on different GPUs), in float64, rounded
    to ``dtype`` (bf16, the dtype of the official pipeline's noise) and only then moved to
    ``device``; see :func:`cpu_standard_normal` for why float64 (CPU code paths and torch
    releases disagree on float32/bf16 draws).  The official pipeline draws
    ``torch.randn(..., dtype=bf16)`` directly, so for the same seed our noise is not the
    official pipeline's bit for bit (that draw is made on its GPU and, in bf16, is not
    stable across torch versions anyway).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return cpu_standard_normal(shape, generator, dtype).to(device)
