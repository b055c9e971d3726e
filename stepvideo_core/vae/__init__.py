"""Step-Video Video-VAE v2: config, layers, encoder, decoder, chunked model, loader."""

from .config import VAEConfig, VAEConfigError
from .latents import from_comfy_latent, to_comfy_latent
from .loader import infer_vae_config, load_vae
from .model import StepVideoVAE, VAEInterrupted, build_vae

__all__ = ["StepVideoVAE", "VAEConfig", "VAEConfigError", "VAEInterrupted", "build_vae", "from_comfy_latent",
           "infer_vae_config", "load_vae", "to_comfy_latent"]
