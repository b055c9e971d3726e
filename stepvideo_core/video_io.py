"""Frames to an .mp4 file (H.264 through PyAV), and the official post-processing.

The official pipeline turns the VAE output into pixels with
``(clamp(-1, 1) + 1) * 127.5 -> uint8`` and saves 25 fps H.264.  It then
center-crops 544x992 to 540x960 by default; here that crop is optional
(:func:`crop_to_540p`), so a video keeps the size that was asked for.

Frames are ``[T, H, W, 3]`` RGB everywhere in this module (ComfyUI's IMAGE
layout); torch tensors and numpy arrays are both accepted.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

DEFAULT_FPS = 25          # the official pipeline's frame rate
CODEC = "libx264"         # H.264, plays everywhere
PIXEL_FORMAT = "yuv420p"  # what browsers and players expect from H.264
OFFICIAL_540P = (540, 960)

ArrayLike = Union[torch.Tensor, np.ndarray]


def official_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> uint8 frames ``[T, H, W, 3]``, as the official pipeline does it.

    ``video`` is ``[B, T, 3, H, W]`` (the VAE's decode) or ``[T, 3, H, W]``; a batch
    becomes its videos one after another.  ``(clamp(-1, 1) + 1) * 127.5`` is computed in
    fp32 and truncated to uint8 (``.to(torch.uint8)``), exactly the official rounding.
    """
    if video.ndim == 5:
        video = video.flatten(0, 1)
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a video [B, T, 3, H, W] or [T, 3, H, W], got {list(video.shape)}")
    pixels = (video.float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_uint8_frames(frames: ArrayLike, value_range: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` as a C-contiguous uint8 numpy array.

    uint8 input is taken as is; float input is mapped from ``value_range`` ((0, 1) for
    ComfyUI IMAGE, (-1, 1) for raw VAE output) to 0..255, clamped and truncated like
    ComfyUI's and the official savers.  Raises ValueError for other shapes.
    """
    array = frames.detach().cpu() if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {list(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError("no frames to write")
    if array.dtype != torch.uint8:
        low, high = (float(v) for v in value_range)
        if high <= low:
            raise ValueError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
        array = ((array.float() - low) * (255.0 / (high - low))).clamp_(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(array.numpy())


def center_crop(frames: ArrayLike, height: int, width: int) -> ArrayLike:
    """The central ``height x width`` window of frames ``[T, H, W, C]`` (unchanged when already that small)."""
    h, w = frames.shape[1], frames.shape[2]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    return frames[:, top:top + min(h, height), left:left + min(w, width)]


def crop_to_540p(frames: ArrayLike) -> ArrayLike:
    """The official optional crop: 540x960 for landscape, 960x540 for portrait frames (centered)."""
    h, w = frames.shape[1], frames.shape[2]
    height, width = OFFICIAL_540P if w >= h else OFFICIAL_540P[::-1]
    return center_crop(frames, height, width)


def write_mp4(path: Union[str, Path], frames: ArrayLike, fps: float = DEFAULT_FPS,
              value_range: Sequence[float] = (0.0, 1.0), crf: Optional[int] = None,
              on_frame: Optional[Callable[[int, int], None]] = None) -> Path:
    """Write ``frames`` ``[T, H, W, 3]`` to ``path`` as H.264 (libx264, yuv420p) at ``fps``; returns the path.

    See :func:`to_uint8_frames` for accepted inputs.  Height and width must be even
    (yuv420p halves the chroma planes).  ``crf`` sets libx264's quality (default 23;
    lower is better).  ``on_frame(done, total)`` follows the encoding.  The parent
    folder is created; an existing file is replaced.
    """
    import av

    pixels = to_uint8_frames(frames, value_range)
    total, height, width = pixels.shape[0], pixels.shape[1], pixels.shape[2]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 in yuv420p needs an even width and height, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(CODEC, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
        if crf is not None:
            stream.options = {"crf": str(int(crf))}
        for i in range(total):
            frame = av.VideoFrame.from_ndarray(pixels[i], format="rgb24")
            container.mux(stream.encode(frame))
            if on_frame is not None:
                on_frame(i + 1, total)
        container.mux(stream.encode(None))
    return path


def read_video_info(path: Union[str, Path]) -> dict:
    """What a player sees in a video file: ``frames`` (decoded), ``width``, ``height``, ``fps``, ``codec``, ``pix_fmt``.

    Decodes every frame to count them (the container's count can be missing), so
    it is meant for checks on short clips, not for long videos.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {"width": stream.codec_context.width, "height": stream.codec_context.height,
                "fps": float(stream.average_rate) if stream.average_rate else None,
                "codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt}
        info["frames"] = sum(1 for _ in container.decode(stream))
    return info


def read_frames(path: Union[str, Path]) -> np.ndarray:
    """All frames of a video file as uint8 RGB ``[T, H, W, 3]`` (for tests and quick checks)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
