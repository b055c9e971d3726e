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

import json
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from .. import ops as default_ops
from ..checkpoint import (SAFETENSORS_SUFFIXES, CheckpointError, PathLike, TensorIndex, load_weights, open_files,
                          open_sharded)
from .step_llm import StepLLM, StepLLMConfig, build_step_llm

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


def infer_shape_fields(index: TensorIndex, head_dim: int) -> dict:
    """Config fields implied by the tensor shapes (``head_dim`` from config.json fixes the group count)."""
    shapes = index.shapes()
    vocab, hidden = shapes[EMBEDDING]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))
    fields = {"hidden_size": hidden, "padded_vocab_size": vocab, "num_layers": layers}
    wqkv = shapes.get("transformer.layers.0.attention.wqkv.weight")
    if wqkv is not None and head_dim:
        fields["num_attention_groups"] = (wqkv[0] - hidden) / (2 * head_dim)
    w2 = shapes.get("transformer.layers.0.feed_forward.w2.weight")
    if w2 is not None:
        fields["ffn_inner"] = w2[1]
    return fields


def read_step_llm_config(config_path: Path, index: TensorIndex) -> StepLLMConfig:
    """config.json checked against the weights: a mismatch names each differing field."""
    try:
        data = json.loads(Path(config_path).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "hidden_size" not in data or "num_attention_heads" not in data:
        kind = data.get("_class_name") or data.get("architectures") if isinstance(data, dict) else None
        raise CheckpointError(f"{config_path} is not a Step-LLM config (no hidden_size / num_attention_heads"
                              f"{f'; it describes {kind}' if kind else ''}); expected step_llm/config.json")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = StepLLMConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    inferred = infer_shape_fields(index, config.head_dim)
    ours = {"hidden_size": config.hidden_size, "padded_vocab_size": config.padded_vocab_size,
            "num_layers": config.num_layers, "num_attention_groups": config.num_attention_groups,
            "ffn_inner": config.ffn_inner}
    labels = {"ffn_inner": "ffn_hidden_size (rounded up to 256)"}
    diffs = [f"{labels.get(f, f)}: config.json says {ours[f]!r}, the weights have {_tidy(inferred[f])!r}"
             for f in inferred if ours[f] != inferred[f]]
    if diffs:
        raise CheckpointError(f"{config_path} does not match the weights in {index.source} "
                              f"(config and shards from different models?): " + "; ".join(diffs))
    return config


def _tidy(value):
    """Whole floats as ints in messages (an implied group count of 8.0 reads as 8)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def load_step_llm(path: PathLike, dtype: Optional[torch.dtype] = torch.bfloat16,
                  device: Union[str, torch.device] = "cpu", alibi: bool = True,
                  operations=default_ops.plain) -> StepLLM:
    """Load the Step-LLM from ``path`` (``step_llm/`` or the release root holding it).

    Returns the bare encoder in eval mode with weights in ``dtype`` on ``device``:
    ``llm(input_ids [B, S], attention_mask [B, S]) -> last hidden state [B, S, hidden]``.
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
