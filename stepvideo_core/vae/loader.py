"""Finding, checking and loading Step-Video VAE v2 checkpoints.

Accepted inputs:

* ``vae/vae_v2.safetensors`` of the release (fp32, 262 tensors), or any single
  ``.safetensors`` copy of it, optionally with keys prefixed ``vae.`` or
  ``first_stage_model.`` (as other tools save them);
* the ``vae/`` folder or the ``stepvideo-t2v/`` root holding it.

The release ships no VAE config, so the architecture is read from tensor shapes
(:func:`infer_vae_config`); reduced-width test checkpoints load through the same path.
The older v1 ``vae.safetensors`` (16 latent channels, no patchify layers) is refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Union

import torch

from .. import ops as default_ops
from ..checkpoint import (SAFETENSORS_SUFFIXES, CheckpointError, PathLike, TensorIndex, identify_checkpoint,
                          load_weights, open_files)
from ..dtypes import default_dtype
from .config import VAEConfig, VAEConfigError
from .model import StepVideoVAE, build_vae

VAE_FILE = "vae_v2.safetensors"
V1_FILE = "vae.safetensors"
VAE_PREFIXES = ("first_stage_model.", "vae.")
# the release stores the decoder's last conv one level up from its module path
_DISK_CONV_OUT, _MODULE_CONV_OUT = "decoder.conv_out.", "decoder.conv_out.conv."


def to_module_name(key: str) -> str:
    """Checkpoint name -> module parameter name (``decoder.conv_out.*`` -> ``decoder.conv_out.conv.*``)."""
    if key.startswith(_DISK_CONV_OUT) and not key.startswith(_MODULE_CONV_OUT):
        return _MODULE_CONV_OUT + key[len(_DISK_CONV_OUT):]
    return key


def to_disk_name(key: str) -> str:
    """Module parameter name -> name in ``vae_v2.safetensors`` (inverse of :func:`to_module_name`)."""
    if key.startswith(_MODULE_CONV_OUT):
        return _DISK_CONV_OUT + key[len(_MODULE_CONV_OUT):]
    return key


def find_vae_file(path: PathLike) -> Path:
    """The VAE v2 safetensors file that ``path`` (file, ``vae/`` folder or release root) designates."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no such file or folder: {path}")
    for candidate in (path / VAE_FILE, path / "vae" / VAE_FILE):
        if candidate.is_file():
            return candidate
    for candidate in (path / V1_FILE, path / "vae" / V1_FILE):
        if candidate.is_file():
            raise CheckpointError(f"{path} holds only {candidate.name}, the Step-Video VAE v1; Step-Video-T2V "
                                  f"needs {VAE_FILE} (download vae/{VAE_FILE} of stepfun-ai/stepvideo-t2v)")
    singles = sorted(p for p in path.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES)
    if len(singles) == 1:
        return singles[0]
    found = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointError(f"no Step-Video VAE in {path}: expected {VAE_FILE} (or vae/{VAE_FILE}), found {found}")


def _levels(shapes: dict, prefix: str) -> list:
    """Sorted level indices ``l`` of keys ``<prefix>.<l>.…``."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _refuse_foreign(index: TensorIndex) -> None:
    """Raise CheckpointError when ``index`` is clearly not a VAE v2 (v1, DiT, text encoder, ...)."""
    shapes = index.shapes()
    names = set(shapes)
    if "encoder.conv_patchify.conv.conv.weight" in names or "decoder.conv_unpatchify.conv.conv.weight" in names:
        return
    if "encoder.conv_in.conv.weight" in names and "decoder.conv_in.conv.weight" in names:
        z = shapes["decoder.conv_in.conv.weight"][1]
        raise CheckpointError(
            f"{index.source} is the Step-Video VAE v1 ({V1_FILE}: {z} latent channels, no patchify layers). "
            f"Step-Video-T2V's latents need the VAE v2: load vae/{VAE_FILE} instead.")
    raise CheckpointError(f"{index.source} is not a Step-Video VAE v2 ({VAE_FILE}): it looks like "
                          f"{identify_checkpoint(names)}.")


def infer_vae_config(index: TensorIndex) -> VAEConfig:
    """The VAE architecture implied by tensor shapes (the release ships no config file)."""
    _refuse_foreign(index)
    shapes = index.shapes()
    required = ("encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight", "decoder.conv_in.conv.weight",
                "encoder.down.0.block.0.conv1.conv.weight", "decoder.up.0.block.0.conv1.conv.weight")
    absent = [k for k in required if k not in shapes]
    if absent:
        raise CheckpointError(f"{index.source} is an incomplete Step-Video VAE v2: it lacks {absent[:3]}")
    enc_ch, in_channels = shapes["encoder.conv_in.conv.weight"][:2]
    z = shapes["decoder.conv_in.conv.weight"][1]
    enc_levels, dec_levels = _levels(shapes, "encoder.down"), _levels(shapes, "decoder.up")
    enc_widths = [shapes.get(f"encoder.down.{l}.block.0.conv1.conv.weight", (0,))[0] for l in enc_levels]
    dec_widths = [shapes.get(f"decoder.up.{l}.block.0.conv1.conv.weight", (0,))[0] for l in dec_levels]
    dec_ch = math.gcd(*dec_widths)
    out_key = "decoder.conv_out.weight" if "decoder.conv_out.weight" in shapes else "decoder.conv_out.conv.weight"
    try:
        return VAEConfig(
            z_channels=z, in_channels=in_channels, out_channels=shapes.get(out_key, (3,))[0], enc_ch=enc_ch,
            enc_ch_mult=tuple(w // enc_ch for w in enc_widths), dec_ch=dec_ch,
            dec_ch_mult=tuple(w // dec_ch for w in dec_widths),
            num_res_blocks=len(_levels(shapes, "encoder.down.0.block")),
            encoder_temporal_down=tuple(l for l in enc_levels
                                        if f"encoder.down.{l}.downsample.conv.conv.weight" in shapes),
            decoder_temporal_up=tuple(l for l in dec_levels
                                      if f"decoder.up.{l}.upsample.conv3d.conv1.conv.weight" in shapes))
    except VAEConfigError as exc:
        raise CheckpointError(f"{index.source}: the tensor shapes give no valid Step-Video VAE v2 ({exc})") from exc


def load_vae(path: PathLike, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
             operations=default_ops.plain) -> StepVideoVAE:
    """Load the Step-Video VAE v2 from ``path`` (see module docstring) in eval mode.

    ``dtype`` None: :func:`~stepvideo_core.dtypes.default_dtype` (bf16 on CUDA, fp32 on the CPU).  Raises CheckpointError (a
    ValueError) naming what is wrong before reading any weight when the file does not fit.
    """
    dtype = default_dtype(device) if dtype is None else dtype
    index = open_files([find_vae_file(path)], prefixes=VAE_PREFIXES)
    config = infer_vae_config(index)
    model = build_vae(config, device="meta", dtype=dtype, operations=operations)
    load_weights(model, index, dtype=dtype, device=device, rename=to_module_name,
                 what=f"a Step-Video VAE v2 with {config.z_channels} latent channels")
    return model.eval()
