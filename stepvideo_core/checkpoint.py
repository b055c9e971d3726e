"""Reading checkpoints: safetensors files, sharded folders, key prefixes, strict checks.

Shared by every component (DiT, VAE, text encoders).  The contract:

* Only safetensors is read here; nothing is ever unpickled.
* A :class:`TensorIndex` knows every tensor's name, shape and file from the
  headers alone, so a wrong file is refused *before* any weight is read
  (nothing is left half-loaded).
* :func:`load_weights` streams one tensor at a time from ``safe_open`` into the
  target dtype/device and hands it to the module: peak memory is the model in
  its target dtype plus one tensor, never a second copy of the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from torch import nn

PathLike = Union[str, os.PathLike]

# Prefixes other tools save the DiT under (ComfyUI's checkpoint savers, diffusers pipelines).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
SHOW = 5  # how many offending names an error message lists


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message says what was expected and found."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, name inside the file, and its header shape/dtype."""

    file: Path
    stored_name: str
    shape: tuple
    dtype: str


class TensorIndex(Mapping[str, TensorEntry]):
    """Canonical tensor name -> :class:`TensorEntry`, read from safetensors headers only."""

    def __init__(self, entries: dict[str, TensorEntry], files: Sequence[Path], stripped_prefix: str = ""):
        self._entries = entries
        self.files = list(files)
        self.stripped_prefix = stripped_prefix

    def __getitem__(self, key: str) -> TensorEntry:
        return self._entries[key]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple]:
        """name -> shape, for config inference and strict checks."""
        return {k: e.shape for k, e in self._entries.items()}

    def describe(self) -> str:
        """A one-line guess of what these tensors are (see :func:`identify_checkpoint`)."""
        return identify_checkpoint(self._entries.keys())

    @property
    def source(self) -> str:
        """Human-readable origin for messages: the file, or the folder of the shards."""
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.files[0].parent} ({len(self.files)} shards)"


def read_header(path: PathLike) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, dtype) of a safetensors file, without reading tensor data.

    Raises CheckpointError for a missing, truncated or non-safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: only safetensors files are loaded (pickled .bin/.pt/.ckpt files can run code "
            f"when opened). Convert it to .safetensors first.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                    for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} ({size:,} bytes) is not a readable safetensors file ({exc}). It is probably truncated "
            f"(an interrupted download or copy) or not a safetensors file at all: download it again.") from exc


def common_prefix(keys: Iterable[str], candidates: Sequence[str] = KNOWN_PREFIXES) -> str:
    """The first candidate prefix that *every* key starts with, or ''."""
    keys = list(keys)
    for prefix in candidates:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def open_files(files: Sequence[PathLike], prefixes: Sequence[str] = KNOWN_PREFIXES) -> TensorIndex:
    """Index of the tensors in ``files`` (shards of one model), with a shared known prefix removed."""
    entries: dict[str, TensorEntry] = {}
    paths = [Path(f) for f in files]
    headers = {p: read_header(p) for p in paths}
    prefix = common_prefix([k for h in headers.values() for k in h], prefixes)
    for path, header in headers.items():
        for stored, (shape, dtype) in header.items():
            name = stored[len(prefix):]
            if name in entries:
                raise CheckpointError(f"tensor {name!r} appears in both {entries[name].file.name} and {path.name}")
            entries[name] = TensorEntry(path, stored, shape, dtype)
    return TensorIndex(entries, paths, prefix)


def open_sharded(index_json: PathLike, prefixes: Sequence[str] = KNOWN_PREFIXES) -> TensorIndex:
    """Index of a sharded checkpoint from its ``*.safetensors.index.json`` (diffusers/HF layout).

    Every shard the index names must exist, and every tensor must be in the shard it is mapped to.
    """
    index_json = Path(index_json)
    try:
        weight_map = json.loads(index_json.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_json} is not a shard index (expected JSON with a 'weight_map'): {exc}") from exc
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not (index_json.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index_json.name} lists {len(shard_names)} shards but {len(missing)} are missing "
                              f"from {index_json.parent}: {missing[:SHOW]} (incomplete download?)")
    index = open_files([index_json.parent / s for s in shard_names], prefixes)
    stored = {e.stored_name: e.file.name for e in index.values()}
    misplaced = [k for k, shard in weight_map.items() if stored.get(k) != shard]
    if misplaced:
        raise CheckpointError(f"{index_json.name} maps tensors to shards that do not hold them, "
                              f"e.g. {misplaced[:SHOW]} (mixed files from different downloads?)")
    return index


def identify_checkpoint(keys: Iterable[str]) -> str:
    """Best guess of which model a set of tensor names belongs to, for error messages."""
    keys = set(keys)
    has = lambda fragment: any(fragment in k for k in keys)  # noqa: E731
    if has("lora_A") or has("lora_down") or has("lora_B") or has("lora_up"):
        return "a LoRA adapter, not a full model (load it with the LoRA loader)"
    if has("transformer_blocks.") and has("attn1.wqkv"):
        return "a Step-Video DiT (transformer) checkpoint"
    if has("decoder.conv_unpatchify") or has("encoder.conv_patchify"):
        return "a Step-Video VAE v2 checkpoint (vae/vae_v2.safetensors)"
    if has("encoder.down.") and has("decoder.up."):
        return "a VAE checkpoint (Step-Video VAE v1 or another video/image VAE)"
    if has("tok_embeddings.word_embeddings") or has("attention.wqkv"):
        return "a Step-LLM text encoder checkpoint (step_llm/)"
    if has("embeddings.word_embeddings") and has("encoder.layer."):
        return "a BERT text encoder checkpoint (HunyuanCLIP)"
    if has("first_stage_model.") or has("cond_stage_model."):
        return "a bundled checkpoint of another model family (model + VAE + text encoder)"
    sample = sorted(keys)[:3]
    return f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {sample})"


def check_keys(expected: Mapping[str, tuple], index: TensorIndex, what: str) -> None:
    """Raise CheckpointError unless ``index`` has exactly the ``expected`` names and shapes."""
    found = index.shapes()
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:SHOW]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:SHOW]})")
    if wrong:
        parts.append("wrong shapes: " + ", ".join(
            f"{k} expected {list(expected[k])} found {list(found[k])}" for k in wrong[:SHOW]))
    raise CheckpointError(f"{index.source} does not fit {what}: " + "; ".join(parts)
                          + f". This file looks like {index.describe()}.")


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of parameter/buffer ``name`` (replacing a meta tensor)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"module has no parameter or buffer named {name!r}")


def load_weights(module: nn.Module, index: TensorIndex, *, dtype: Optional[torch.dtype],
                 device: Union[str, torch.device] = "cpu", what: str = "the model",
                 rename: Optional[Callable[[str], str]] = None,
                 take: Optional[Callable[[str, torch.Tensor], bool]] = None) -> nn.Module:
    """Strictly check, then stream every tensor of ``index`` into ``module``; returns ``module``.

    ``module`` is usually built on the meta device.  Floating tensors are cast
    to ``dtype`` (None keeps the file's dtype) on ``device`` one at a time.
    ``rename`` maps checkpoint names to module names (e.g. the VAE's on-disk quirk).
    ``take(name, tensor)`` sees each tensor first, as read from the file (CPU, file
    dtype); when it returns True it has stored the tensor itself (how fp8 layers
    quantise weights as they load) and the default cast-and-assign is skipped.
    """
    rename = rename or (lambda k: k)
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    renamed = TensorIndex({rename(k): e for k, e in index.items()}, index.files, index.stripped_prefix)
    check_keys(expected, renamed, what)
    device = torch.device(device)
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name, entry in renamed.items():
        by_file.setdefault(entry.file, []).append((name, entry))
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name, entry in items:
                tensor = handle.get_tensor(entry.stored_name)
                if take is not None and take(name, tensor):
                    del tensor
                    continue
                target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
                _assign(module, name, tensor.to(device=device, dtype=target))
                del tensor
    return module
