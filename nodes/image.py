"""Image-to-video node family: a core IMAGE (LoadImage) + the VAE -> what StepVideoSampler needs for TI2V.

``StepVideoImageToVideo`` is the official TI2V pipeline's image step: the first frame of the IMAGE
(ComfyUI's [0, 1] HWC) as the official [-1, 1] CHW, cover-resized and centre-cropped to the video
size, encoded as a one-frame video (a posterior sample from a seeded CPU generator), followed by
zero latent frames (:func:`stepvideo_core.image_condition`).  Its output goes to the sampler's
``image_condition`` input with the motion score; the sampler checks the sizes agree.
"""

from __future__ import annotations

import logging

from ..stepvideo_core.checks import finite_float
from ..stepvideo_core.condition import image_condition, image_from_comfy, image_noise_generator
from ..stepvideo_core.sampling import PRESETS, TI2V_PRESET, check_video_size
from .sampler import MAX_SEED, video_size_inputs
from .types import STEPVIDEO_IMAGE_CONDITION, STEPVIDEO_VAE, StepVideoImageCondition

log = logging.getLogger("StepVideo")

TI2V = PRESETS[TI2V_PRESET]
MOTION_SCORE_RANGE = (0.0, 100.0)


def motion_score_input() -> tuple:
    """The motion-score widget (one definition for the one-node and the native image-to-video nodes)."""
    return ("FLOAT", {"default": TI2V.motion_score, "min": MOTION_SCORE_RANGE[0], "max": MOTION_SCORE_RANGE[1],
                      "step": 0.5, "tooltip": "How much the video moves: 2 steadier, 5 general (official default), "
                                              "10-20 more motion."})


def size_inputs() -> dict:
    """width/height/frames widgets of an image-to-video node (the video the condition is made for)."""
    return video_size_inputs(TI2V.frames, "official TI2V: 102 (about 4 s at 25 fps).",
                             "The image is resized to cover it and centre-cropped.")


def encode_first_frame(vae_handle, image, width: int, height: int, frames: int, seed: int):
    """The condition latent [1, F, 64, h, w] (fp32, CPU) of ``image``'s first frame, the VAE on its device.

    Raises ImageConditionError / SizeError (ValueErrors) naming what is wrong before the VAE runs.
    """
    from .vae import run_on_device

    check_video_size(width, height, frames)
    picture = image_from_comfy(image)                   # [3, h, w] in [-1, 1]
    generator = image_noise_generator(seed)
    return run_on_device(vae_handle, lambda vae: image_condition(vae, picture, width=width, height=height,
                                                                 frames=frames, generator=generator))


class StepVideoImageToVideo:
    """Encodes the first frame of an image into the condition of a Step-Video-TI2V run."""

    CATEGORY = "StepVideo/image to video"
    FUNCTION = "encode"
    RETURN_TYPES = (STEPVIDEO_IMAGE_CONDITION,)
    RETURN_NAMES = ("image_condition",)
    OUTPUT_TOOLTIPS = ("The first-frame condition and motion score, for StepVideo Sampler's image_condition input "
                       "(with a Step-Video-TI2V model).",)
    DESCRIPTION = (
        "Step-Video-TI2V's image step: the first frame of the image is resized to cover width x height, "
        "centre-cropped, and encoded by the VAE as the video's first latent frame (the rest are zeros). "
        "Connect it to StepVideo Sampler's image_condition, with a Step-Video-TI2V model and the same size."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (STEPVIDEO_VAE, {"tooltip": "From StepVideo VAE Loader (the TI2V release uses the T2V VAE)."}),
            "image": ("IMAGE", {"tooltip": "The first frame of the video (e.g. from Load Image; a batch uses its "
                                           "first image)."}),
            **size_inputs(),
            "motion_score": motion_score_input(),
            "seed": ("INT", {"default": 1234, "min": 0, "max": MAX_SEED,
                             "tooltip": "Seed of the VAE's posterior sample of the image latent (CPU generator)."}),
        }}

    def encode(self, vae, image, width, height, frames, motion_score, seed):
        """Return the UI note and the STEPVIDEO_IMAGE_CONDITION; a NaN/Inf motion score raises ValueError."""
        motion_score = finite_float(motion_score, "motion_score")
        latent = encode_first_frame(vae, image, width, height, frames, seed)
        source = f"{image.shape[2]}x{image.shape[1]}" if getattr(image, "ndim", 0) == 4 else "image"
        text = (f"first frame {source} -> {width}x{height}, {frames} frames: condition {list(latent.shape)}, "
                f"motion score {motion_score:g}")
        log.info("StepVideo image to video: %s", text)
        return {"ui": {"text": [text]}, "result": (StepVideoImageCondition(latent, int(width), int(height),
                                                                           int(frames), motion_score),)}


NODE_CLASS_MAPPINGS = {"StepVideoImageToVideo": StepVideoImageToVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"StepVideoImageToVideo": "StepVideo Image to Video"}
