"""Finding, checking and loading Step-Video DiT checkpoints.

Accepted inputs (the same code loads the released 30B files and tiny test files):

* the official ``stepvideo-t2v/`` (or ``stepvideo-t2v-turbo/``) folder,
* its ``transformer/`` subfolder: ``config.json`` + ``diffusion_pytorch_model-0000k-of-0000n.safetensors``
  + ``diffusion_pytorch_model.safetensors.index.json``,
* one ``.safetensors`` file, optionally with the ``model.diffusion_model.`` /
  ``diffusion_model.`` / ``transformer.`` key prefixes other tools save with; its
  config is then inferred from the tensor shapes.

The same goes for Step-Video-TI2V (``stepvideo-ti2v/``): the weights tell the two apart
(:func:`weights_are_ti2v`: a patch embed taking twice the latent channels and the
``adaln_single.emb.motion_score_embedder`` keys), so ``use_additional_conditions`` follows
the weights even when config.json omits it or says otherwise (with a warning in that case).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from .. import fp8
from .. import ops as default_ops
from ..checkpoint import (SAFETENSORS_SUFFIXES, CheckpointError, PathLike, TensorIndex, load_weights, open_files,
                          open_sharded)
from .config import ConfigError, StepVideoDiTConfig, require_dit_config
from .model import StepVideoTransformer, build_transformer

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# How block weights are stored once loaded: "full" = the compute dtype; "fp8_scaled" = float8_e4m3fn
# with per-output-channel scales (see stepvideo_core.fp8); "auto" = fp8_scaled for pre-quantised files.
WEIGHT_FORMATS = ("auto", "full", "fp8_scaled")
# Layers stored in fp8 when a full-precision checkpoint is quantised at load: the blocks' Linears.
FP8_PREFIX = "transformer_blocks."
# config fields that the tensor shapes determine; config.json must agree with them
_SHAPE_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                 "patch_size", "caption_channels", "norm_elementwise_affine")
# Only Step-Video-TI2V has these (its AdaLN-single embeds the motion score).
MOTION_SCORE_PREFIX = "adaln_single.emb.motion_score_embedder."


class VariantMismatchWarning(UserWarning):
    """config.json's ``use_additional_conditions`` contradicts the weights; the weights were followed."""


def find_transformer_files(path: PathLike) -> tuple[TensorIndex, Optional[Path]]:
    """Resolve ``path`` to (tensor index, config.json path or None).  See module docstring."""
    path = Path(path).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        return open_files([path]), None if not config.is_file() else _config_if_dit(config)
    if not path.is_dir():
        raise CheckpointError(f"no such file or folder: {path}")
    if (path / "transformer").is_dir():
        return find_transformer_files(path / "transformer")
    config = path / "config.json"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        preferred = path / INDEX_NAME
        index_json = preferred if preferred.is_file() else indexes[0]
        return open_sharded(index_json), config if config.is_file() else None
    singles = sorted(p for p in path.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES)
    if len(singles) == 1:
        return open_files(singles), config if config.is_file() else None
    found = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointError(
        f"no Step-Video transformer in {path}: expected a 'transformer/' subfolder, or config.json with "
        f"diffusion_pytorch_model-*.safetensors shards and {INDEX_NAME}, or a single .safetensors file; "
        f"found {found}")


def _config_if_dit(config: Path) -> Optional[Path]:
    """Return ``config`` when it is a DiT config.json (``_class_name`` StepVideoModel), else None.

    A single .safetensors file may sit in a folder whose config.json belongs to something
    else (a VAE, a text encoder); such a config is ignored rather than applied to the DiT.
    """
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return None
    return config if data.get("_class_name") == "StepVideoModel" else None


def shape_fields(index: TensorIndex) -> dict:
    """The config fields the tensor shapes imply (:data:`_SHAPE_FIELDS`), as raw values, not validated.

    Exists so that config.json can be compared with the weights field by field before
    either is validated.  Raises CheckpointError when the tensors are not a Step-Video DiT.
    """
    shapes = index.shapes()
    required = ("pos_embed.proj.weight", "adaln_single.linear.weight", "proj_out.weight",
                "caption_projection.linear_1.weight", "transformer_blocks.0.attn1.q_norm.weight")
    absent = [k for k in required if k not in shapes]
    if absent:
        raise CheckpointError(f"{index.source} is not a Step-Video DiT checkpoint: it lacks {absent[:3]}. "
                              f"It looks like {index.describe()}.")
    dim, patch_channels, patch, _ = shapes["pos_embed.proj.weight"]
    ti2v = weights_are_ti2v(index)
    head_dim = shapes["transformer_blocks.0.attn1.q_norm.weight"][0]
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    caption = shapes["caption_projection.linear_1.weight"][1]
    clip = shapes.get("clip_projection.weight")
    return dict(num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
                in_channels=patch_channels // 2 if ti2v else patch_channels,
                out_channels=shapes["proj_out.weight"][0] // (patch * patch), num_layers=layers, patch_size=patch,
                norm_elementwise_affine="norm_out.weight" in shapes,
                caption_channels=[caption, clip[1]] if clip else caption)


def weights_are_ti2v(index: TensorIndex) -> bool:
    """True when the tensors are a Step-Video-TI2V DiT, False for T2V / Turbo; from the headers alone.

    TI2V has the ``adaln_single.emb.motion_score_embedder.*`` keys and a patch embed taking
    2 x the output channels (latents ++ image condition: [D, 128, 1, 1] in the release); T2V has
    neither.  Raises CheckpointError for a checkpoint with one sign and not the other (a broken or
    hand-edited file), naming what it has.
    """
    shapes = index.shapes()
    motion = [k for k in shapes if k.startswith(MOTION_SCORE_PREFIX)]
    patch_channels = shapes["pos_embed.proj.weight"][1]
    patch = shapes["pos_embed.proj.weight"][2]
    out_channels = shapes["proj_out.weight"][0] // (patch * patch)
    doubled = patch_channels == 2 * out_channels
    if motion and not doubled:
        raise CheckpointError(
            f"{index.source} has the Step-Video-TI2V motion-score embedder ({MOTION_SCORE_PREFIX}*) but its "
            f"pos_embed.proj takes {patch_channels} channels, not 2 x {out_channels} (latents + image condition) "
            f"as TI2V's does: a damaged or mixed checkpoint")
    if doubled and not motion:
        raise CheckpointError(
            f"{index.source} has a pos_embed.proj taking {patch_channels} = 2 x {out_channels} channels like "
            f"Step-Video-TI2V's, but no {MOTION_SCORE_PREFIX}* weights (TI2V has them, T2V has neither): a "
            f"damaged or mixed checkpoint")
    return bool(motion)


def infer_config(index: TensorIndex) -> StepVideoDiTConfig:
    """DiT config implied by tensor shapes (for single files shipped without config.json), TI2V included."""
    try:
        return StepVideoDiTConfig(**shape_fields(index), use_additional_conditions=weights_are_ti2v(index))
    except ConfigError as exc:
        raise CheckpointError(f"{index.source}: {exc}") from exc


def read_config(config_path: Path, index: TensorIndex) -> StepVideoDiTConfig:
    """config.json checked against the weights; returns the validated config.

    The fields the shapes determine are compared first, as config.json states them: a
    mismatch names the file and every differing field with both values
    (``attention_head_dim: config.json says 64, the weights have 128``).  Only a config
    that agrees with the weights is validated (StepVideoDiTConfig's own checks).
    """
    try:
        data = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    try:
        require_dit_config(data, source=str(config_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    stated, implied = StepVideoDiTConfig.stated_fields(data), shape_fields(index)
    diffs = [f"{f}: config.json says {stated[f]!r}, the weights have {implied[f]!r}"
             for f in _SHAPE_FIELDS if stated[f] != implied[f]]
    if diffs:
        raise CheckpointError(f"{config_path} does not match the weights in {index.source} "
                              f"(config and shards from different models?): " + "; ".join(diffs))
    ti2v = weights_are_ti2v(index)
    if "use_additional_conditions" in data and data["use_additional_conditions"] != ti2v:
        warnings.warn(VariantMismatchWarning(
            f"{config_path}: use_additional_conditions: config.json says {data['use_additional_conditions']!r}, "
            f"the weights have {ti2v!r} ({_variant_evidence(index, ti2v)}); the weights win: loading it as "
            f"{'Step-Video-TI2V' if ti2v else 'Step-Video-T2V'}"), stacklevel=3)
    data = dict(data, use_additional_conditions=ti2v)  # the weights decide (omitted in some config.json files)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return StepVideoDiTConfig.from_dict(data, source=str(config_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def _variant_evidence(index: TensorIndex, ti2v: bool) -> str:
    """What in the weights says TI2V or T2V, for the config.json mismatch warning."""
    channels = index.shapes()["pos_embed.proj.weight"][1]
    if ti2v:
        return f"a {channels}-channel pos_embed.proj and {MOTION_SCORE_PREFIX}* weights: Step-Video-TI2V"
    return f"a {channels}-channel pos_embed.proj and no motion-score embedder: Step-Video-T2V"


def resolve_config(index: TensorIndex, config_path: Optional[Path]) -> StepVideoDiTConfig:
    """The DiT config of a checkpoint: its config.json checked against the shapes, or inferred from them.

    Reads config.json and the headers only, so callers can validate against the architecture
    (e.g. LoRA adapters, on a meta-device model) before any weight is read.
    """
    return read_config(config_path, index) if config_path else infer_config(index)


def meta_transformer(path: PathLike) -> StepVideoTransformer:
    """The DiT architecture of the checkpoint at ``path`` on the meta device: names and shapes, no weights.

    Reads config.json and the headers only (so it costs a second even for the 30B files);
    what LoRA validation binds against before the real weights are loaded.
    """
    index, config_path = find_transformer_files(path)
    return build_transformer(resolve_config(index, config_path), device="meta")


def detect_weight_format(index: TensorIndex) -> str:
    """"fp8_scaled" when the checkpoint holds fp8 weights (a pre-quantised file), else "full"."""
    return "fp8_scaled" if fp8.is_scaled_fp8_file({k: e.dtype for k, e in index.items()}) else "full"


def resolve_weight_format(weight_format: str, index: TensorIndex) -> str:
    """The concrete format ("full" or "fp8_scaled") that ``weight_format`` means for this checkpoint."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight_format {weight_format!r}; expected one of {WEIGHT_FORMATS}")
    return detect_weight_format(index) if weight_format == "auto" else weight_format


def load_transformer(path: PathLike, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device] = "cpu", attention: str = "sdpa",
                     operations=default_ops.plain, weight_format: str = "auto",
                     model_class: type = StepVideoTransformer) -> StepVideoTransformer:
    """Load a Step-Video DiT from ``path`` (folder or file, see module docstring).

    Returns the model in eval mode on ``device`` with weights in ``dtype``, except
    that with ``weight_format`` "fp8_scaled" the blocks' Linear weights are stored
    in fp8 with per-channel scales (quantised while loading a full-precision file,
    kept as they are from a pre-quantised one).  "auto" (the default) follows the
    file; "full" dequantises a pre-quantised file to ``dtype``.  ``model.weight_format``
    records the result.  ``operations`` replaces the layer family (with fp8 its ``Linear``
    must be a :class:`~stepvideo_core.fp8.ScaledFp8Linear`) and ``model_class`` the
    :class:`StepVideoTransformer` class (a subclass; see :func:`build_transformer`).  Raises CheckpointError (a ValueError) naming what is wrong
    before reading any weight when the files do not fit.
    """
    index, config_path = find_transformer_files(path)
    config = resolve_config(index, config_path)
    file_format = detect_weight_format(index)
    weight_format = resolve_weight_format(weight_format, index)
    use_fp8 = "fp8_scaled" in (weight_format, file_format)
    if use_fp8 and operations is default_ops.plain:
        operations = fp8.scaled_fp8
    model = build_transformer(config, device="meta", dtype=dtype, operations=operations, model_class=model_class)
    take = None
    if use_fp8:
        try:
            skip = fp8.prepare_for_scaled_file(model, index.shapes()) if file_format == "fp8_scaled" else []
        except ValueError as exc:
            raise CheckpointError(f"{index.source}: {exc}") from exc
        if skip:
            index = TensorIndex({k: e for k, e in index.items() if k not in skip}, index.files, index.stripped_prefix)
        if weight_format == "fp8_scaled" and file_format == "full":
            for layer in fp8.fp8_layers(model, FP8_PREFIX).values():
                layer.quantize_on_load = True
        take = fp8.make_take_hook(model, device, source=index.source)
    load_weights(model, index, dtype=dtype, device=device, take=take,
                 what=f"a Step-Video DiT with {config.num_layers} blocks of width {config.inner_dim}")
    if weight_format == "full" and file_format == "fp8_scaled":
        fp8.dequantize_model(model, dtype)
    model.weight_format = weight_format
    model.attention_backend = attention
    return model
