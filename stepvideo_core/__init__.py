"""Step-Video-T2V in pure PyTorch: the model code behind the ComfyUI-StepVideo pack.

Never imports ComfyUI; usable and testable on its own.  Public API:

* :func:`build_transformer` / :func:`load_transformer` - the 30B DiT.
* :class:`StepVideoDiTConfig` - its config (mirrors ``transformer/config.json``).
* :func:`build_vae` / :func:`load_vae` - the Video-VAE v2 (``vae/vae_v2.safetensors``).
* :func:`flow_match_sigmas` - the official sampling schedule; :func:`sample` - the denoising loop.
* :class:`CheckpointError` - raised for files that do not fit, with what was expected and found.
"""

from .checkpoint import CheckpointError, identify_checkpoint
from .dit import ConfigError, StepVideoDiTConfig, StepVideoTransformer, build_transformer
from .dit.loader import load_transformer
from .sampling import flow_match_sigmas, sample
from .vae import build_vae, load_vae

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "StepVideoDiTConfig", "StepVideoTransformer", "build_transformer",
           "identify_checkpoint", "load_transformer", "build_vae", "load_vae", "flow_match_sigmas", "sample",
           "__version__"]
