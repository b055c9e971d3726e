"""Architecture of the Step-Video Video-VAE (version 2), and the frame arithmetic it implies.

The release ships no config for the VAE: the official pipeline constructs
``AutoencoderKL(z_channels=64, version=2)`` and relies on the class defaults.
:class:`VAEConfig` spells those defaults out; reduced-width test checkpoints
differ only in widths and latent channels, which the loader reads back from the
tensor shapes (:func:`stepvideo_core.vae.loader.infer_vae_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

GROUPS = 32            # every GroupNorm has 32 groups (so every width is a multiple of 32)
NORM_EPS = 1e-5        # nn.GroupNorm default, used by the official code
FRAME_CHUNK = 17       # video frames encoded independently
LATENTS_PER_CHUNK = 3  # latent frames decoded independently (17 -> 3 -> 17)
SPATIAL_FACTOR = 16    # pixels per latent pixel along H and W
PATCH = 2              # (un)patchify factor of the v2 space-to-channel layers
SEAM_KEEP = 0.6        # weight a frame keeps when the seam between two decoded chunks is blended
LOGVAR_RANGE = (-30.0, 20.0)


class VAEConfigError(ValueError):
    """A VAE config that the official architecture cannot take."""


@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of the official v2 encoder/decoder; defaults = released ``vae_v2``.

    Widths are ``ch * ch_mult[level]``.  The encoder has ``num_res_blocks`` res-blocks per
    level, the decoder ``num_res_blocks + 1``.  ``encoder_temporal_down`` lists the encoder
    levels whose downsampler also halves time (the others are 2D); ``decoder_temporal_up``
    the decoder levels whose upsampler doubles time.
    """

    z_channels: int = 64
    in_channels: int = 3
    out_channels: int = 3
    enc_ch: int = 32
    enc_ch_mult: Tuple[int, ...] = (4, 8, 16, 16)
    dec_ch: int = 128
    dec_ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    encoder_temporal_down: Tuple[int, ...] = (1, 2)
    decoder_temporal_up: Tuple[int, ...] = (2, 3)

    def __post_init__(self) -> None:
        for name in ("enc_ch_mult", "dec_ch_mult", "encoder_temporal_down", "decoder_temporal_up"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        for name in ("z_channels", "in_channels", "out_channels", "enc_ch", "dec_ch", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise VAEConfigError("invalid Step-Video VAE config: " + "; ".join(problems))
        levels = len(self.enc_ch_mult)
        if levels < 2 or len(self.dec_ch_mult) != levels:
            problems.append(f"encoder and decoder need the same number (>= 2) of levels, got "
                            f"{self.enc_ch_mult} and {self.dec_ch_mult}")
        widths = [self.enc_ch, *self.encoder_widths, *self.decoder_widths]
        if any(w % GROUPS for w in widths):
            problems.append(f"every width must be a multiple of {GROUPS} (GroupNorm groups), got {widths}")
        if sorted(set(self.encoder_temporal_down)) != list(self.encoder_temporal_down) or \
                not set(self.encoder_temporal_down) <= set(range(levels - 1)):
            problems.append(f"encoder_temporal_down must be increasing levels in 0..{levels - 2}")
        if sorted(set(self.decoder_temporal_up)) != list(self.decoder_temporal_up) or \
                not set(self.decoder_temporal_up) <= set(range(1, levels)):
            problems.append(f"decoder_temporal_up must be increasing levels in 1..{levels - 1}")
        if len(self.encoder_temporal_down) != 2 or len(self.decoder_temporal_up) != 2:
            problems.append("the 17-frame <-> 3-latent chunking needs exactly two temporal down- and "
                            "up-sampling levels")
        if not problems:
            # the averaging / duplicating shortcuts map 8*width <-> 32*z channels in whole groups
            if (self.encoder_widths[-1] * PATCH ** 3) % self.patch_channels or \
                    (self.decoder_widths[-1] * PATCH ** 3) % self.patch_channels:
                problems.append(f"z_channels {self.z_channels} does not fit the widths: the patchify layers need "
                                f"8*{self.encoder_widths[-1]} and 8*{self.decoder_widths[-1]} to be multiples "
                                f"of 32*z = {self.patch_channels}")
        if problems:
            raise VAEConfigError("invalid Step-Video VAE config: " + "; ".join(problems))

    # -- derived sizes ---------------------------------------------------------
    @property
    def encoder_widths(self) -> Tuple[int, ...]:
        """Output width of each encoder level (128, 256, 512, 512 for the release)."""
        return tuple(self.enc_ch * m for m in self.enc_ch_mult)

    @property
    def decoder_widths(self) -> Tuple[int, ...]:
        """Output width of each decoder level, indexed like ``decoder.up.{level}`` (128, 256, 512, 512)."""
        return tuple(self.dec_ch * m for m in self.dec_ch_mult)

    @property
    def patch_channels(self) -> int:
        """Channels between the (un)patchify layers and the latent convs: 4 * z * 2^3 (2048)."""
        return 4 * self.z_channels * PATCH ** 3

    def to_dict(self) -> dict:
        """Plain dict (lists for tuples), e.g. for logs and metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VAEConfig":
        """Build from a dict of field names; unknown keys raise VAEConfigError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VAEConfigError(f"unknown Step-Video VAE config keys {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


def _nearest_multiples(value: int, step: int) -> str:
    """'a or b': the multiples of ``step`` around ``value`` (only b when a would be 0)."""
    below, above = (value // step) * step, (value // step + 1) * step
    return f"{below} or {above}" if below > 0 else f"{above}"


def check_video_shape(shape) -> None:
    """Raise ValueError unless ``shape`` is a video [B, T, 3, H, W] the encoder takes.

    T must be a multiple of 17 and H, W multiples of 16; the message names the nearest valid values.
    """
    if len(shape) != 5:
        raise ValueError(f"video must be [B, T, C, H, W], got shape {list(shape)}")
    frames, height, width = shape[1], shape[3], shape[4]
    if frames % FRAME_CHUNK or frames == 0:
        raise ValueError(f"the Step-Video VAE encodes chunks of {FRAME_CHUNK} frames: got {frames} frames; "
                         f"use {_nearest_multiples(frames, FRAME_CHUNK)}")
    check_pixels(height, width)


def check_latent_shape(shape, z_channels: int) -> None:
    """Raise ValueError unless ``shape`` is latents [B, F, z, h, w] the decoder takes (F a multiple of 3)."""
    if len(shape) != 5:
        raise ValueError(f"latents must be [B, F, C, h, w], got shape {list(shape)}")
    if shape[2] != z_channels:
        hint = (" (they look like [B, C, F, h, w]; convert with from_comfy_latent)"
                if shape[1] == z_channels else "")
        raise ValueError(f"latents must have {z_channels} channels on dim 2 ([B, F, C, h, w]), "
                         f"got shape {list(shape)}{hint}")
    frames = shape[1]
    if frames % LATENTS_PER_CHUNK or frames == 0:
        raise ValueError(f"the Step-Video VAE decodes chunks of {LATENTS_PER_CHUNK} latent frames: got {frames} latent "
                         f"frames; use {_nearest_multiples(frames, LATENTS_PER_CHUNK)}")


def check_pixels(height: int, width: int) -> None:
    """Raise ValueError unless height and width are positive multiples of 16."""
    for name, value in (("height", height), ("width", width)):
        if value % SPATIAL_FACTOR or value == 0:
            raise ValueError(f"{name} {value} is not a multiple of {SPATIAL_FACTOR}; "
                             f"use {_nearest_multiples(value, SPATIAL_FACTOR)}")
