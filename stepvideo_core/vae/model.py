"""The Step-Video Video-VAE v2: chunked encode/decode, seam blending and optional spatial tiling.

Layouts are the official ones: video [B, T, 3, H, W] in [-1, 1], latents [B, F, z, h, w]
(see :mod:`stepvideo_core.vae.latents` for ComfyUI's [B, C, F, h, w]).

Chunks are independent (no cache across them): 17 frames encode to 3 latent frames and
3 latent frames decode to 17 frames.  Both directions run one chunk at a time and write
into a preallocated output, so peak memory does not grow with the video length.
Progress and cancellation reach the caller only through the ``on_chunk(done, total)``
and ``should_stop()`` callbacks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .. import ops as default_ops
from ..checks import NonFiniteError, count_non_finite
from ..memory import trim_host_heap
from .config import (FRAME_CHUNK, LATENTS_PER_CHUNK, LOGVAR_RANGE, SEAM_KEEP, SPATIAL_FACTOR, VAEConfig, check_pixels,
                     check_latent_shape, check_video_shape)
from .decoder import VideoDecoder
from .encoder import VideoEncoder
from .layers import CausalConv, Downsample2D, MidAttention, Upsample2D

OnChunk = Optional[Callable[[int, int], Any]]
ShouldStop = Optional[Callable[[], bool]]


class VAEInterrupted(InterruptedError):
    """``should_stop()`` returned True (between chunks or inside one); the partial result is discarded."""


# The stages of the encoder/decoder before which ``should_stop`` is polled inside a chunk: every
# convolution (the causal 3D ones, and the 2D re-samplers) and the mid attention, so a stop lands within
# one convolution's compute instead of a whole 17-frame chunk's (bench/bench_vae_cancel.py).
POLLED_STAGES = (CausalConv, MidAttention, Upsample2D, Downsample2D)


@contextmanager
def polled(module: nn.Module, should_stop: ShouldStop, message: str) -> Iterator[None]:
    """Within the block, raise :class:`VAEInterrupted` (with ``message``) before any :data:`POLLED_STAGES`
    of ``module`` runs once ``should_stop()`` is True.

    Exists so a cancel during a long chunk (seconds at 544x992 on a GPU, minutes on a CPU) is answered
    within one stage.  Forward pre-hooks leave the model code untouched; they are removed on exit.
    """
    if should_stop is None:
        yield
        return

    def check(_module, _args):
        if should_stop():
            raise VAEInterrupted(message)

    handles = [m.register_forward_pre_hook(check) for m in module.modules() if isinstance(m, POLLED_STAGES)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def blend_seam(video: torch.Tensor, boundary: int, keep: float = SEAM_KEEP) -> None:
    """Blend, in place, the two frames meeting at ``boundary`` of ``video`` [B, T, ...].

    Official order: the first frame of the later chunk (``back``) is updated first, then
    the last frame of the earlier chunk (``front``) from the *updated* back.
    """
    mix = 1.0 - keep
    front, back = video[:, boundary - 1], video[:, boundary]
    back.copy_(back * keep + front * mix)
    front.copy_(front * keep + back * mix)


def tile_starts(size: int, tile: int, overlap: int) -> list:
    """Start offsets of tiles of ``tile`` covering ``size`` with at least ``overlap`` in common."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def feather(length: int, ramp: int, head: bool, tail: bool) -> torch.Tensor:
    """1D weights of one tile: linear ramps of ``ramp`` samples (never 0) on the sides shared with a neighbour."""
    weights = torch.ones(length)
    ramp = min(ramp, length)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
        if head:
            weights[:ramp] = torch.minimum(weights[:ramp], up)
        if tail:
            weights[length - ramp:] = torch.minimum(weights[length - ramp:], up.flip(0))
    return weights


class StepVideoVAE(nn.Module):
    """``AutoencoderKL`` (v2) with parameter names of ``vae_v2.safetensors`` (except ``decoder.conv_out.conv``).

    Build with :func:`build_vae`, load with :func:`stepvideo_core.load_vae`.
    """

    def __init__(self, config: VAEConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.encoder = VideoEncoder(config, operations, device=device, dtype=dtype)
        self.decoder = VideoDecoder(config, operations, device=device, dtype=dtype)
        self.requires_grad_(False)

    # -- properties --------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the convolutions run in (that of the weights)."""
        return self.decoder.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.conv.weight.device

    def num_parameters(self) -> int:
        """Number of weights (elements), as the checkpoint counts them."""
        return sum(p.numel() for p in self.parameters())

    # -- encode ------------------------------------------------------------------
    @torch.no_grad()
    def encode_chunk(self, video: torch.Tensor) -> torch.Tensor:
        """Moments [B, 3, 2z, H/16, W/16] (mean | logvar) of one 17-frame chunk [B, 17, 3, H, W]."""
        if video.shape[1] != FRAME_CHUNK:
            raise ValueError(f"encode_chunk takes exactly {FRAME_CHUNK} frames, got {video.shape[1]}")
        check_video_shape(video.shape)
        x = video.to(device=self.device, dtype=self.compute_dtype).transpose(1, 2)
        return self.encoder(x)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: Optional[torch.Generator] = None, sample: bool = True,
               on_chunk: OnChunk = None, should_stop: ShouldStop = None,
               output_device: Union[None, str, torch.device] = None) -> torch.Tensor:
        """Latents [B, T/17*3, z, H/16, W/16] of ``video`` [B, T, 3, H, W] in [-1, 1].

        ``sample`` True: the posterior sample mean + std * noise (logvar clamped to
        [-30, 20]), where the noise for the *whole* latent is drawn at once like the
        official code, from ``generator`` (or the global RNG); False: the mean.  A CPU
        ``generator`` draws through :func:`~stepvideo_core.sampling.noise.cpu_standard_normal`
        (float64, rounded), so a seed gives the same latent on every machine and torch version.
        """
        check_video_shape(video.shape)
        bad = count_non_finite(video)
        if bad:
            raise NonFiniteError(f"the frames to encode hold {bad} NaN/Inf values (of {video.numel()}); "
                                 f"expected pixel values in [-1, 1]")
        batch, frames, _, height, width = video.shape
        chunks = frames // FRAME_CHUNK
        z = self.config.z_channels
        shape = (batch, chunks * LATENTS_PER_CHUNK, z, height // SPATIAL_FACTOR, width // SPATIAL_FACTOR)
        out = torch.empty(shape, dtype=self.compute_dtype, device=output_device or self.device)
        noise = self._posterior_noise(shape, generator, out.device) if sample else None
        for i in range(chunks):
            _check_stop(should_stop, "encode", i, chunks)
            with polled(self.encoder, should_stop, f"VAE encode stopped on request inside chunk {i + 1} of {chunks}"):
                moments = self.encode_chunk(video[:, i * FRAME_CHUNK:(i + 1) * FRAME_CHUNK]).to(out.device)
            mean, logvar = moments.chunk(2, dim=2)
            target = out[:, i * LATENTS_PER_CHUNK:(i + 1) * LATENTS_PER_CHUNK]
            if noise is None:
                target.copy_(mean)
            else:
                std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
                target.copy_(mean + std * noise[:, i * LATENTS_PER_CHUNK:(i + 1) * LATENTS_PER_CHUNK])
            del moments, mean, logvar
            if out.device.type == "cpu":
                trim_host_heap()
            if on_chunk is not None:
                on_chunk(i + 1, chunks)
        return out

    def _posterior_noise(self, shape: tuple, generator: Optional[torch.Generator], device) -> torch.Tensor:
        """Standard normal noise of the posterior sample, drawn once for the whole latent, in the compute dtype.

        A CPU ``generator`` draws the machine-independent way (float64, rounded); without one
        the global RNG draws on the VAE's device, as the official encode does.
        """
        if generator is not None and generator.device.type == "cpu":
            # imported here: sampling.noise takes its size constants from vae.config (the
            # VAE defines them), so a module-level import would make the two packages circular
            from ..sampling.noise import cpu_standard_normal
            noise = cpu_standard_normal(shape, generator, torch.float32)
        else:
            noise_device = generator.device if generator is not None else self.device
            noise = torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32)
        return noise.to(device=device, dtype=self.compute_dtype)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generator: Optional[torch.Generator] = None,
                     sample: bool = True) -> torch.Tensor:
        """Latent [B, 1, z, H/16, W/16] of ``image`` [B, 3, H, W] in [-1, 1], encoded as a one-frame video.

        What the official TI2V pipeline does with its first frame: the causal encoder turns one
        frame into one latent frame (no 17-frame chunk).  ``sample``/``generator`` as :meth:`encode`.
        """
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(f"encode_image takes [B, {self.config.in_channels}, H, W], got {list(image.shape)}")
        check_pixels(image.shape[-2], image.shape[-1])
        bad = count_non_finite(image)
        if bad:
            raise NonFiniteError(f"the image to encode holds {bad} NaN/Inf values (of {image.numel()}); "
                                 f"expected pixel values in [-1, 1]")
        x = image.to(device=self.device, dtype=self.compute_dtype)[:, :, None]  # [B, 3, 1, H, W]
        moments = self.encoder(x)  # [B, 1, 2z, h, w]
        mean, logvar = moments.chunk(2, dim=2)
        if not sample:
            return mean
        noise = self._posterior_noise(tuple(mean.shape), generator, mean.device)
        return mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * noise

    # -- decode ------------------------------------------------------------------
    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, tile: Optional[int] = None, overlap: int = 8) -> torch.Tensor:
        """Frames [B, 17, 3, 16h, 16w] of one 3-frame latent chunk [B, 3, z, h, w]; not blended, not clamped.

        ``tile`` (latent pixels) decodes overlapping tiles of at most tile x tile latents,
        ``overlap`` apart at least, blended with linear feathering (not official: the mid
        attention and per-frame norms then see only their tile).
        """
        check_latent_shape(latents.shape, self.config.z_channels)
        if latents.shape[1] != LATENTS_PER_CHUNK:
            raise ValueError(f"decode_chunk takes exactly {LATENTS_PER_CHUNK} latent frames, got {latents.shape[1]}")
        z = latents.to(device=self.device, dtype=self.compute_dtype).transpose(1, 2)
        h, w = z.shape[-2:]
        if tile is None or (h <= tile and w <= tile):
            return self.decoder(z).transpose(1, 2)
        return self._decode_tiled(z, tile, overlap)

    def _decode_tiled(self, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """Tiled :meth:`decode_chunk` body: weighted sum of tile decodes over the weight sum."""
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"tiling needs tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
        f = SPATIAL_FACTOR
        b, _, _, h, w = z.shape
        acc = torch.zeros(b, FRAME_CHUNK, self.config.out_channels, h * f, w * f, device=z.device,
                          dtype=torch.float32)
        total = torch.zeros(h * f, w * f, device=z.device, dtype=torch.float32)
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        for y in ys:
            th = min(tile, h)
            wy = feather(th * f, overlap * f, head=y > 0, tail=y + th < h)
            for x in xs:
                tw = min(tile, w)
                wx = feather(tw * f, overlap * f, head=x > 0, tail=x + tw < w)
                weight = (wy[:, None] * wx[None, :]).to(z.device)
                frames = self.decoder(z[..., y:y + th, x:x + tw]).transpose(1, 2)
                region = (slice(None), slice(None), slice(None), slice(y * f, (y + th) * f), slice(x * f, (x + tw) * f))
                acc[region] += frames.float() * weight
                total[region[3:]] += weight
                del frames
        return acc.div_(total).to(self.compute_dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, on_chunk: OnChunk = None, should_stop: ShouldStop = None,
               clamp: bool = True, tile: Optional[int] = None, overlap: int = 8,
               output_device: Union[None, str, torch.device] = None) -> torch.Tensor:
        """Video [B, F/3*17, 3, 16h, 16w] of ``latents`` [B, F, z, h, w], in [-1, 1] when ``clamp``.

        3-latent chunks are decoded one by one into a preallocated output and every seam
        is blended (:func:`blend_seam`) as soon as both its sides exist.  Raises
        :class:`~stepvideo_core.checks.NonFiniteError` for NaN/Inf latents, and for a chunk
        that decodes to NaN/Inf (clamping would turn either into a black or white video).
        """
        check_latent_shape(latents.shape, self.config.z_channels)
        bad = count_non_finite(latents)
        if bad:
            raise NonFiniteError(f"the latents to decode hold {bad} NaN/Inf values (of {latents.numel()}): they "
                                 f"would decode to a black video. Sample them again (in bf16 rather than fp16), "
                                 f"without the adapter or file that produced them.")
        batch, frames, _, h, w = latents.shape
        chunks = frames // LATENTS_PER_CHUNK
        out = torch.empty(batch, chunks * FRAME_CHUNK, self.config.out_channels, h * SPATIAL_FACTOR,
                          w * SPATIAL_FACTOR, dtype=self.compute_dtype, device=output_device or self.device)
        for i in range(chunks):
            _check_stop(should_stop, "decode", i, chunks)
            with polled(self.decoder, should_stop, f"VAE decode stopped on request inside chunk {i + 1} of {chunks}"):
                part = self.decode_chunk(latents[:, i * LATENTS_PER_CHUNK:(i + 1) * LATENTS_PER_CHUNK], tile=tile,
                                         overlap=overlap)
            if not bool(torch.isfinite(part).all()):
                raise NonFiniteError(f"VAE decode produced NaN/Inf in chunk {i + 1} of {chunks} (from finite "
                                     f"latents): the VAE overflowed in {str(self.compute_dtype).replace('torch.', '')}"
                                     f" or its weights are damaged. Decode in bf16 or fp32.")
            out[:, i * FRAME_CHUNK:(i + 1) * FRAME_CHUNK].copy_(part)
            del part
            if i > 0:
                blend_seam(out, i * FRAME_CHUNK)
            if out.device.type == "cpu":
                trim_host_heap()  # keep resident memory flat in video length (see memory.py)
            if on_chunk is not None:
                on_chunk(i + 1, chunks)
        return out.clamp_(-1.0, 1.0) if clamp else out


def _check_stop(should_stop: ShouldStop, what: str, done: int, total: int) -> None:
    """Raise :class:`VAEInterrupted` when ``should_stop()`` asks for it (checked before each chunk; inside
    a chunk :func:`polled` checks before every stage)."""
    if should_stop is not None and should_stop():
        raise VAEInterrupted(f"VAE {what} stopped on request after {done} of {total} chunks")


def build_vae(config: Union[None, Mapping[str, Any], VAEConfig] = None, device: Union[str, torch.device] = "meta",
              dtype: Optional[torch.dtype] = None, operations=default_ops.plain) -> StepVideoVAE:
    """The VAE without weights (``meta`` by default: no memory) for ``config``.

    ``None`` gives the released architecture (262 tensors, 498,818,819 weights); a dict
    takes :class:`VAEConfig` field names.  Weights on a real device are uninitialised.
    """
    if config is None:
        config = VAEConfig()
    elif not isinstance(config, VAEConfig):
        config = VAEConfig.from_dict(config)
    return StepVideoVAE(config, operations=operations, device=device, dtype=dtype).eval()
