"""Sampling: the official flow-matching schedule, seeded noise, the denoising loop, previews."""

from ..checks import NonFiniteError
from .noise import SizeError, check_video_size, initial_noise, latent_shape, video_frames
from .sampler import CONDITIONING_KEYS, sample
from .schedule import (DEFAULT_PRESET, PRESETS, Preset, euler_step, flow_match_sigmas, guidance, preset_table,
                       resolve_settings)

__all__ = ["CONDITIONING_KEYS", "DEFAULT_PRESET", "NonFiniteError", "PRESETS", "Preset", "SizeError",
           "check_video_size", "euler_step", "flow_match_sigmas", "guidance", "initial_noise", "latent_shape",
           "preset_table", "resolve_settings", "sample", "video_frames"]
