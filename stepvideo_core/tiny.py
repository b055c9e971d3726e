"""Tiny random models in the exact official file layout.

Used by the CLI's smoke checks (no real weights needed) and by the test suite:
the files have the official key names, shard naming, index json and
config.json, so they go through the very loaders that read the released
checkpoints.  Weights are random but deterministic for a given seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from .dit import StepVideoDiTConfig, build_transformer

# Same shape family as the official parity fixture: 2 blocks, 2 heads of 128, LLM width 96, CLIP width 48.
TINY_DIT_CONFIG = dict(num_attention_heads=2, attention_head_dim=128, in_channels=64, out_channels=64,
                       num_layers=2, patch_size=1, norm_eps=1e-6, norm_elementwise_affine=False,
                       use_additional_conditions=False, caption_channels=[96, 48], attention_type="parallel")
DIT_WEIGHTS = "diffusion_pytorch_model"


def random_state_dict(shapes: Mapping[str, tuple], seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights for ``shapes``, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        r = torch.randn(shape, generator=gen)
        if "norm" in name and name.endswith(".weight") and len(shape) == 1:
            value = 1.0 + 0.1 * r
        elif len(shape) == 1:
            value = 0.05 * r
        elif "scale_shift_table" in name:
            value = r / math.sqrt(shape[-1])
        else:
            value = r / math.sqrt(math.prod(shape[1:]))
        out[name] = value.to(dtype).contiguous()
    return out


def tiny_dit_state_dict(config: Optional[Mapping] = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random DiT weights under the official checkpoint names for ``config`` (default tiny)."""
    model = build_transformer(dict(config or TINY_DIT_CONFIG), device="meta")
    return random_state_dict({k: v.shape for k, v in model.state_dict().items()}, seed, dtype)


def write_sharded(state_dict: Mapping[str, torch.Tensor], folder: Path, stem: str, shards: int = 2) -> list[Path]:
    """Write ``<stem>-0000k-of-0000n.safetensors`` shards + ``<stem>.safetensors.index.json`` (HF layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state_dict)
    shards = max(1, min(shards, len(names)))
    per = math.ceil(len(names) / shards)
    weight_map, files, total = {}, [], 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state_dict[k].contiguous() for k in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
        total += sum(state_dict[k].numel() * state_dict[k].element_size() for k in part)
        files.append(folder / file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def dit_config_json(config: Mapping) -> dict:
    """config.json contents as diffusers writes them for the official StepVideoModel."""
    data = {"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0"}
    data.update(StepVideoDiTConfig.from_dict(dict(config)).to_dict())
    return data


def write_dit_checkpoint(state_dict: Mapping[str, torch.Tensor], config: Mapping, directory: Path,
                         layout: str = "official", prefix: str = "", shards: int = 2) -> Path:
    """Write DiT weights in one of the layouts users have; returns the path to hand to the loader.

    layout "official": ``<dir>/model_index.json`` + ``<dir>/transformer/{config.json, shards, index}``
    (returns ``<dir>``); "transformer": the transformer folder itself (returns it);
    "single": ``<dir>/stepvideo_dit.safetensors`` with keys prefixed by ``prefix`` (returns the file).
    """
    directory = Path(directory)
    if layout == "single":
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "stepvideo_dit.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in state_dict.items()}, str(path))
        return path
    if layout not in ("official", "transformer"):
        raise ValueError(f"layout must be 'official', 'transformer' or 'single', got {layout!r}")
    folder = directory / "transformer" if layout == "official" else directory
    write_sharded({prefix + k: v for k, v in state_dict.items()}, folder, DIT_WEIGHTS, shards)
    (folder / "config.json").write_text(json.dumps(dit_config_json(config), indent=2))
    if layout == "official":
        (directory / "model_index.json").write_text(json.dumps({
            "_class_name": "StepVideoPipeline", "_diffusers_version": "0.31.0",
            "scheduler": ["stepvideo", "FlowMatchDiscreteScheduler"],
            "transformer": ["stepvideo", "StepVideoModel"]}, indent=2))
        return directory
    return folder


def write_tiny_dit(directory, layout: str = "official", seed: int = 0, prefix: str = "",
                   config: Optional[Mapping] = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny random DiT written in ``layout`` (see :func:`write_dit_checkpoint`); bf16 on disk like the release."""
    config = dict(config or TINY_DIT_CONFIG)
    return write_dit_checkpoint(tiny_dit_state_dict(config, seed, dtype), config, Path(directory), layout, prefix)
