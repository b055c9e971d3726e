"""The first-frame image condition of Step-Video-TI2V: image -> resized crop -> VAE latent -> padded condition.

What the official TI2V pipeline does before sampling (reference: ``stepvideo-ti2v.md`` §2):

1. the image, RGB in [-1, 1] ``[3, h, w]``, is scaled so that it *covers* the target size (the
   scale of the side that is relatively shorter), the scaled size rounded to whole pixels,
   resized bilinearly with antialiasing and centre-cropped to exactly ``height x width``;
2. the crop is VAE-encoded as a one-frame video (one latent frame, a posterior sample);
3. that latent is followed by zeros for the other latent frames: ``[B, F, z, h, w]``.  The sampler
   gives the same condition to both guidance branches.

Image files and ComfyUI ``IMAGE`` tensors are turned into the official ``[3, h, w]`` in [-1, 1] by
:func:`image_from_file` / :func:`image_from_comfy`, which accept what users bring (RGB, RGBA,
greyscale, palette, 16-bit) and refuse what cannot be an image with a message saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .checks import count_non_finite
from .sampling.noise import check_video_size
from .vae.config import FRAME_CHUNK, LATENTS_PER_CHUNK


class ImageConditionError(ValueError):
    """An image that cannot condition a TI2V run; the message says what was expected and found."""


def covering_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The (height, width) an ``height x width`` image is resized to so that it covers the target, rounded.

    The official rule: when the image is relatively narrower than the target, its width is scaled
    to the target's width, else its height to the target's height; both sides are then rounded.
    """
    if width / height < target_width / target_height:
        scale = target_width / width
    else:
        scale = target_height / height
    # Python's round (half to even) on the float product, as the official int(round(x))
    return max(int(round(height * scale)), target_height), max(int(round(width * scale)), target_width)


def resize_and_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``image`` [3, h, w] (or [B, 3, h, w]) resized to cover ``height x width`` and centre-cropped to it.

    Bilinear with antialiasing (what torchvision's ``Resize`` does on tensors, through the same
    ``interpolate`` call), then the crop at ``top = dh // 2``, ``left = dw // 2``.  Returns the
    input's rank, float32.
    """
    batched = image.ndim == 4
    x = (image if batched else image[None]).float()
    scaled = covering_size(x.shape[-2], x.shape[-1], height, width)
    if scaled != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=scaled, mode="bilinear", align_corners=False, antialias=True)
    top, left = (scaled[0] - height) // 2, (scaled[1] - width) // 2
    x = x[..., top:top + height, left:left + width]
    return x if batched else x[0]


# Offset between a run's seed and the seed of its image's posterior noise (see image_noise_generator).
IMAGE_SEED_OFFSET = 1


def image_noise_generator(seed: int) -> torch.Generator:
    """The CPU generator of the image latent's posterior noise for a run seeded ``seed``.

    Seeded with ``seed + 1`` (mod 2**64), not ``seed``: the initial noise of the run is drawn
    from ``seed`` the same way (:func:`~stepvideo_core.sampling.noise.initial_noise`, float64 on the
    CPU), so the same seed would make the posterior noise equal the first latent frame's initial
    noise, value for value.  The official pipeline draws both from one advancing global RNG, so
    they differ there too.  Returns a new generator (same seed, same draw, on every machine).
    """
    return torch.Generator(device="cpu").manual_seed((int(seed) + IMAGE_SEED_OFFSET) & 0xFFFF_FFFF_FFFF_FFFF)


def image_condition(vae, image: torch.Tensor, *, width: int, height: int, frames: int, batch: int = 1,
                    generator: Optional[torch.Generator] = None, sample: bool = True) -> torch.Tensor:
    """The TI2V condition ``[batch, frames/17*3, z, height/16, width/16]`` (fp32, CPU) for ``image`` [3, h, w].

    The first latent frame is the VAE latent of the resized crop (a posterior sample drawn from
    ``generator``, or from the global RNG as the official pipeline does; the mean when ``sample``
    is False); the other latent frames are zeros.
    """
    check_video_size(width, height, frames)
    check_image(image)
    crop = resize_and_crop(image, height, width)[None]                    # [1, 3, H, W]
    latent = vae.encode_image(crop, generator=generator, sample=sample).float().cpu()  # [1, 1, z, h, w]
    latent_frames = frames // FRAME_CHUNK * LATENTS_PER_CHUNK
    condition = torch.zeros((1, latent_frames) + tuple(latent.shape[2:]), dtype=torch.float32)
    condition[:, :1] = latent
    return condition.expand(batch, *condition.shape[1:]).contiguous()


def check_image(image: torch.Tensor) -> None:
    """Raise :class:`ImageConditionError` unless ``image`` is a finite RGB tensor [3, h, w] with h, w >= 1."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ImageConditionError(f"the condition image must be RGB [3, height, width] in [-1, 1], got {shape}")
    if min(image.shape[1:]) < 1:
        raise ImageConditionError(f"the condition image is empty ({image.shape[1]}x{image.shape[2]} pixels)")
    bad = count_non_finite(image)
    if bad:
        raise ImageConditionError(f"the condition image holds {bad} NaN/Inf values (of {image.numel()})")


def image_from_comfy(images: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Frame ``index`` of a ComfyUI ``IMAGE`` [N, H, W, C] in [0, 1] as the official [3, H, W] in [-1, 1].

    C = 3 is RGB; C = 4 drops the alpha channel (what the official ``convert('RGB')`` does); C = 1
    (greyscale) is repeated to RGB.
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImageConditionError(f"expected an IMAGE [frames, height, width, channels] (e.g. from LoadImage), "
                                  f"got {shape}")
    if images.ndim == 3:
        images = images[None]
    if images.shape[0] == 0:
        raise ImageConditionError("the IMAGE holds no frames: connect a LoadImage (or any image) to the image input")
    channels = images.shape[-1]
    if channels not in (1, 3, 4):
        raise ImageConditionError(f"expected an IMAGE with 1, 3 or 4 channels (last axis), got {channels} "
                                  f"(shape {list(images.shape)})")
    frame = images[index].float()
    rgb = frame[..., :3] if channels != 1 else frame.expand(*frame.shape[:2], 3)
    image = rgb.permute(2, 0, 1).mul(2.0).sub(1.0).contiguous()
    check_image(image)
    return image


def image_from_file(path: Union[str, Path]) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP...; 8 or 16 bits, RGB/RGBA/greyscale/palette) as [3, H, W] in [-1, 1].

    8-bit images go through Pillow's ``convert('RGB')`` exactly as the official pipeline opens them;
    16-bit and 32-bit greyscale modes are scaled by their own range instead (``convert('RGB')``
    would clip them).  Raises :class:`ImageConditionError` for a missing or unreadable file.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise ImageConditionError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                array = np.asarray(img, dtype=np.float64) / 65535.0
            elif img.mode in ("I", "F"):
                array = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode == "I" and array.max() > 255 else (255.0 if img.mode == "I" else 1.0)
                array = np.clip(array / peak, 0.0, 1.0)
            else:
                array = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageConditionError(f"{path} is not an image Pillow can read ({exc})") from exc
    tensor = torch.from_numpy(array).float()
    if tensor.ndim == 2:
        tensor = tensor[..., None].expand(*tensor.shape, 3)
    image = tensor.permute(2, 0, 1).mul(2.0).sub(1.0).contiguous()
    check_image(image)
    return image
