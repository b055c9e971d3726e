"""Sampling: the official flow-matching schedule, seeded noise, the denoising loop, its step cache, previews."""

from ..checks import NonFiniteError
from .cache import CACHE_MODES, Calibration, CalibrationNotFound, StepCache
from .noise import SizeError, check_video_size, initial_noise, latent_shape, video_frames
from .sampler import CONDITIONING_KEYS, check_image_inputs, model_is_ti2v, sample
from .settings import Placement, SamplingSettings
from .schedule import (DEFAULT_MOTION_SCORE, DEFAULT_PRESET, PRESETS, TI2V_PRESET, Preset, euler_step,
                       flow_match_sigmas, guidance, preset_for, resolve_motion_score, resolve_settings)

__all__ = ["CACHE_MODES", "CONDITIONING_KEYS", "Calibration", "CalibrationNotFound", "StepCache", "DEFAULT_MOTION_SCORE", "DEFAULT_PRESET", "NonFiniteError", "PRESETS", "Preset",
           "Placement", "SamplingSettings",
           "SizeError", "TI2V_PRESET", "check_image_inputs", "check_video_size", "euler_step", "flow_match_sigmas",
           "guidance", "initial_noise", "latent_shape", "model_is_ti2v", "preset_for",
           "resolve_motion_score", "resolve_settings", "sample", "video_frames"]
