"""Finding, checking and loading the Step-LLM (``step_llm/``) with the DiT's strict rules.

Accepted inputs:

* the release's ``step_llm/`` folder: ``config.json``, ``model-0000k-of-0000n.safetensors``
  shards and ``model.safetensors.index.json`` (289 tensors for the 19.6B model),
  or ``config.json`` with one ``.safetensors`` file;
* the ``stepvideo-t2v/`` root holding that folder.

``config.json`` is required: the head count cannot be read from tensor shapes.
Every other field that the shapes determine is checked against them, and a
mismatch names each differing field.  Pickled weights (``*.bin``) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import torch

from .. import ops as default_ops
from ..checkpoint import (SAFETENSORS_SUFFIXES, CheckpointError, PathLike, TensorIndex, load_weights, open_files,
                          open_sharded)
from .step_llm import StepLLM, StepLLMConfig, build_step_llm, swiglu_width

STEP_LLM_DIR = "step_llm"
INDEX_NAME = "model.safetensors.index.json"
EMBEDDING = "tok_embeddings.word_embeddings.weight"
_LAYER = re.compile(r"transformer\.layers\.(\d+)\.")


def find_step_llm_dir(path: PathLike) -> Path:
    """The folder holding the Step-LLM files that ``path`` designates (itself or ``<path>/step_llm``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.is_file():
        raise CheckpointError(f"{path} is a file; the Step-LLM is loaded from its folder (step_llm/ with "
                              f"config.json, the safetensors shards and {INDEX_NAME})")
    if not (path / "config.json").is_file() and (path / STEP_LLM_DIR).is_dir():
        return path / STEP_LLM_DIR
    return path


def find_step_llm_files(path: PathLike) -> tuple[TensorIndex, Path]:
    """Resolve ``path`` to (tensor index from headers only, config.json path).  See module docstring."""
    folder = find_step_llm_dir(path)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    singles = sorted(p for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES)
    if indexes:
        preferred = folder / INDEX_NAME
        index = open_sharded(preferred if preferred.is_file() else indexes[0], prefixes=())
    elif len(singles) == 1:
        index = open_files(singles, prefixes=())
    elif pickles and not singles:
        raise CheckpointError(f"{folder} holds only pickled weights {pickles[:4]}; pickles can run code when "
                              f"opened and are not loaded. Use the safetensors shards of the release "
                              f"(model-0000k-of-0000n.safetensors + {INDEX_NAME}).")
    else:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise CheckpointError(f"no Step-LLM weights in {folder}: expected config.json, model-0000k-of-0000n."
                              f"safetensors shards and {INDEX_NAME} (the release's step_llm/ folder); found {found}")
    if EMBEDDING not in index or not any(_LAYER.match(k) for k in index):
        raise CheckpointError(f"{index.source} is not a Step-LLM checkpoint (no {EMBEDDING} / "
                              f"transformer.layers.*): it looks like {index.describe()}.")
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"config.json is missing from {folder}; the Step-LLM needs it (the head count "
                              f"cannot be read from the weights). Download step_llm/config.json of the release.")
    return index, config


def shape_fields(index: TensorIndex) -> dict:
    """What the tensor shapes fix, as raw numbers: ``hidden_size``, ``padded_vocab_size``, ``num_layers``,
    and when present ``ffn_inner`` (the SwiGLU width) and ``kv_rows`` (key/value rows of ``attention.wqkv``,
    = 2 x head_dim x groups).  Exists so config.json can be compared with the weights before validation."""
    shapes = index.shapes()
    vocab, hidden = shapes[EMBEDDING]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))
    fields = {"hidden_size": hidden, "padded_vocab_size": vocab, "num_layers": layers}
    wqkv = shapes.get("transformer.layers.0.attention.wqkv.weight")
    if wqkv is not None:
        fields["kv_rows"] = wqkv[0] - hidden
    w2 = shapes.get("transformer.layers.0.feed_forward.w2.weight")
    if w2 is not None:
        fields["ffn_inner"] = w2[1]
    return fields


def _stated_fields(data: dict) -> dict:
    """Every StepLLMConfig field as config.json ``data`` states it (defaults for the absent ones), not validated."""
    return {f.name: data.get(f.name, f.default) for f in dataclasses.fields(StepLLMConfig)}


def _group_mismatch(stated: dict, implied: dict) -> Optional[str]:
    """The heads/groups disagreement between config.json and ``attention.wqkv``, in words, or None.

    The weights fix only the ratio groups/heads (= kv_rows / (2 x hidden_size)), not either
    count; so a mismatch is stated in terms of the field the weights do determine, never as
    a fractional group count that would blame the wrong field.
    """
    heads, groups = stated["num_attention_heads"], stated["num_attention_groups"]
    if "kv_rows" not in implied or not all(isinstance(v, int) and v > 0 for v in (heads, groups)):
        return None  # nothing to compare (the config's own validation reports bad values)
    ratio = Fraction(implied["kv_rows"], 2 * implied["hidden_size"])
    if Fraction(groups, heads) == ratio:
        return None
    implied_groups = ratio * heads
    either = f"the weights fix only groups/heads = {ratio}: either field may be wrong"
    if implied_groups.denominator == 1:
        return (f"num_attention_groups: config.json says {groups}, the weights have {implied_groups.numerator} "
                f"with num_attention_heads {heads} ({either})")
    return (f"num_attention_groups / num_attention_heads: config.json says {groups} groups for {heads} heads, "
            f"the weights imply groups/heads = {ratio} (attention.wqkv has {implied['kv_rows']} key/value rows "
            f"for width {implied['hidden_size']}): either field may be wrong")


def read_step_llm_config(config_path: Path, index: TensorIndex) -> StepLLMConfig:
    """config.json checked against the weights; returns the validated config.

    The fields the shapes determine are compared first, as config.json states them, and a
    mismatch names each differing field with both values; only a config that agrees with the
    weights is validated (StepLLMConfig's own checks), so a wrong ``hidden_size`` reads as
    such, not as a consequence of it.
    """
    try:
        data = json.loads(Path(config_path).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "hidden_size" not in data or "num_attention_heads" not in data:
        kind = data.get("_class_name") or data.get("architectures") if isinstance(data, dict) else None
        raise CheckpointError(f"{config_path} is not a Step-LLM config (no hidden_size / num_attention_heads"
                              f"{f'; it describes {kind}' if kind else ''}); expected step_llm/config.json")
    stated, implied = _stated_fields(data), shape_fields(index)
    diffs = [f"{f}: config.json says {stated[f]!r}, the weights have {implied[f]!r}"
             for f in ("hidden_size", "padded_vocab_size", "num_layers") if stated[f] != implied[f]]
    groups = _group_mismatch(stated, implied)
    diffs += [groups] if groups else []
    if "ffn_inner" in implied and isinstance(stated["ffn_hidden_size"], int):
        inner = swiglu_width(stated["ffn_hidden_size"])  # the config's own rule, before validation
        if inner != implied["ffn_inner"]:
            diffs.append(f"ffn_hidden_size (rounded up to 256): config.json says {inner!r}, "
                         f"the weights have {implied['ffn_inner']!r}")
    if diffs:
        raise CheckpointError(f"{config_path} does not match the weights in {index.source} "
                              f"(config and shards from different models?): " + "; ".join(diffs))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return StepLLMConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc


def load_step_llm(path: PathLike, dtype: Optional[torch.dtype] = torch.bfloat16,
                  device: Union[str, torch.device] = "cpu", alibi: bool = True,
                  operations=default_ops.plain) -> StepLLM:
    """Load the Step-LLM from ``path`` (``step_llm/`` or the release root holding it).

    Returns the bare encoder in eval mode with weights in ``dtype`` on ``device``:
    ``llm(input_ids [B, S]) -> last hidden state [B, S, hidden]`` (no mask: see :class:`.StepLLM`).
    ``alibi=False`` runs plain causal attention instead of the inferred sqrt-ALiBi
    bias (see :mod:`.step_llm`).  Raises CheckpointError naming what is wrong before
    any weight is read when the files do not fit.
    """
    index, config_path = find_step_llm_files(path)
    config = read_step_llm_config(config_path, index)
    model = build_step_llm(config, device="meta", dtype=dtype, operations=operations, alibi=alibi)
    load_weights(model, index, dtype=dtype, device=device,
                 what=f"a Step-LLM with {config.num_layers} layers of width {config.hidden_size}")
    return model
