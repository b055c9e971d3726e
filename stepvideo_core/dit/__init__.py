"""Step-Video diffusion transformer (T2V, Turbo and the image-to-video TI2V): config, 3D RoPE, blocks, model."""

from .config import ConfigError, StepVideoDiTConfig
from .model import StepVideoTransformer, build_transformer

__all__ = ["ConfigError", "StepVideoDiTConfig", "StepVideoTransformer", "build_transformer"]
