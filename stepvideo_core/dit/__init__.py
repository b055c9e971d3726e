"""Step-Video-T2V diffusion transformer: config, 3D RoPE, blocks, model."""

from .config import ConfigError, StepVideoDiTConfig
from .model import StepVideoTransformer, build_transformer

__all__ = ["ConfigError", "StepVideoDiTConfig", "StepVideoTransformer", "build_transformer"]
