"""HunyuanCLIP (``hunyuan_clip/``): the 24-layer BERT text tower, through transformers.

The release folder holds ``clip_text_encoder/`` (a transformers ``BertModel``
folder: ``config.json`` and ``pytorch_model.bin``) and ``tokenizer/`` (a
``BertTokenizer``).  We use transformers' own BertModel/BertTokenizer; this
module adds what the official wrapper does around them (pad/truncate to 77,
``last_hidden_state`` in fp32) and strict checks of the weight file:

* ``model.safetensors`` is preferred when present; the released
  ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)`` (no code
  can run), never with a full unpickler;
* the tensor names/shapes must match the config exactly.  Tolerated extras,
  never used: ``embeddings.position_ids`` (a buffer older transformers saved),
  ``cls.*`` (pre-training heads) and a ``bert.`` prefix; the pooler is built
  only when the file has its weights (its output is discarded, as officially).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from ..checkpoint import CheckpointError, PathLike, TensorEntry, TensorIndex, check_keys, read_header

log = logging.getLogger("StepVideo")

CLIP_DIR = "hunyuan_clip"
ENCODER_DIR = "clip_text_encoder"
TOKENIZER_DIR = "tokenizer"
CLIP_TOKENS = 77
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
_IGNORED_PREFIXES = ("cls.",)
_IGNORED_KEYS = ("embeddings.position_ids",)
# How torch's weights-only reader words a refusal for code: "GLOBAL module.name" (a function or class
# it will not import), or a pointer to its allowlist (an object it will not build).
_GLOBAL_REFERENCE = re.compile(r"GLOBAL ([\w.]+)")
_ALLOWLIST_HINT = "add_safe_globals"


def find_clip_dir(path: PathLike) -> Path:
    """The ``hunyuan_clip`` folder that ``path`` designates (itself, or ``<path>/hunyuan_clip``)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"no such folder: {path} (HunyuanCLIP is loaded from the release's "
                              f"{CLIP_DIR}/ folder holding {ENCODER_DIR}/ and {TOKENIZER_DIR}/)")
    if not (path / ENCODER_DIR).is_dir() and (path / CLIP_DIR).is_dir():
        path = path / CLIP_DIR
    missing = [d for d in (ENCODER_DIR, TOKENIZER_DIR) if not (path / d).is_dir()]
    if missing:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(f"{path} is not a HunyuanCLIP folder: {missing} missing (expected {ENCODER_DIR}/ "
                              f"with config.json + {PICKLE_NAME} or {SAFETENSORS_NAME}, and {TOKENIZER_DIR}/ "
                              f"with vocab.txt); found {found}")
    return path


def clip_weight_file(encoder_dir: Path) -> Path:
    """The weight file to read: ``model.safetensors`` if present, else ``pytorch_model.bin``."""
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (encoder_dir / name).is_file():
            return encoder_dir / name
    found = sorted(p.name for p in encoder_dir.iterdir())[:10]
    raise CheckpointError(f"no HunyuanCLIP weights in {encoder_dir}: expected {SAFETENSORS_NAME} or "
                          f"{PICKLE_NAME}; found {found}")


def _pickle_shapes(path: Path) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, dtype) of a torch-saved state dict, read with ``weights_only=True`` (memory-mapped).

    Raises CheckpointError saying which of two things is wrong: the pickle references code
    (classes or functions, e.g. ``posix.system``; refused before anything in it is built, so
    nothing ran), or the file is truncated/corrupt.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files saved in torch's pre-1.6 format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = sorted(set(_GLOBAL_REFERENCE.findall(str(exc))))
        if not (names or _ALLOWLIST_HINT in str(exc)):
            raise CheckpointError(_damaged_pickle_message(path, exc)) from None
        shown = f" ({', '.join(names)})" if names else ""
        raise CheckpointError(
            f"{path} is refused: it is a pickle that references code{shown}, not only tensors. It was never "
            f"unpickled (the weights_only=True reader stops at the first code reference), so nothing in it ran. "
            f"Use {SAFETENSORS_NAME} instead (the release ships it next to {PICKLE_NAME}; put it in "
            f"{path.parent}), or re-save the tensors as safetensors from a copy you trust.") from None
    except Exception as exc:  # the unpickler raises many types; all mean "damaged"
        raise CheckpointError(_damaged_pickle_message(path, exc)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (it holds a {type(state).__name__}); "
                              f"use {SAFETENSORS_NAME} of the release")
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()}


def _damaged_pickle_message(path: Path, exc: Exception) -> str:
    """The message for a .bin that cannot be read: truncated or corrupt, with the reader's own words."""
    detail = str(exc).strip()
    if not detail or "weights_only" in detail:  # never pass on torch's advice to switch the safe reader off
        detail = type(exc).__name__
    return (f"{path} ({path.stat().st_size:,} bytes) is truncated or corrupt: it could not be read as a "
            f"torch-saved state dict ({detail}). An interrupted download or copy? Download it again, or use "
            f"{SAFETENSORS_NAME} of the release instead.")


def clip_index(weight_file: Path) -> TensorIndex:
    """Index of the CLIP weight file with the tolerated extras removed (see module docstring)."""
    header = read_header(weight_file) if weight_file.suffix == ".safetensors" else _pickle_shapes(weight_file)
    names = list(header)
    prefix = "bert." if names and all(k.startswith("bert.") for k in names if not k.startswith("cls.")) else ""
    entries = {}
    for stored, (shape, dtype) in header.items():
        name = stored[len(prefix):] if stored.startswith(prefix) else stored
        if name in _IGNORED_KEYS or stored.startswith(_IGNORED_PREFIXES):
            continue
        entries[name] = TensorEntry(weight_file, stored, shape, dtype)
    return TensorIndex(entries, [weight_file], prefix)


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bar for the duration (restoring the caller's setting)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class HunyuanClip(nn.Module):
    """BertTokenizer + BertModel; ``encode(prompts) -> last_hidden_state [B, 77, hidden]`` in fp32."""

    def __init__(self, tokenizer, bert: nn.Module, max_length: int = CLIP_TOKENS):
        super().__init__()
        self.tokenizer = tokenizer
        self.bert = bert
        self.max_length = max_length

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each int64 [B, 77]: padded to and truncated at 77 tokens."""
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_attention_mask=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def token_count(self, prompt: str) -> int:
        """Number of BERT tokens of ``prompt`` with [CLS]/[SEP], before truncation (for notes in the UI)."""
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state`` [B, S, hidden] in fp32 (the official server runs CLIP in fp32)."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Tokenize and run on the weights' device; returns fp32 [B, 77, hidden] there."""
        ids, mask = self.tokenize(prompts)
        device = next(self.bert.parameters()).device
        return self(ids.to(device), mask.to(device))


def load_hunyuan_clip(path: PathLike, dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device] = "cpu") -> HunyuanClip:
    """Load HunyuanCLIP from ``path`` (``hunyuan_clip/`` or the release root holding it).

    Returns a :class:`HunyuanClip` in eval mode on ``device``.  The weight file is
    checked (names and shapes vs ``config.json``) before it is loaded; a file that
    does not fit raises CheckpointError saying what was expected and found.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = find_clip_dir(path)
    encoder_dir, tokenizer_dir = folder / ENCODER_DIR, folder / TOKENIZER_DIR
    if not (encoder_dir / "config.json").is_file():
        raise CheckpointError(f"config.json is missing from {encoder_dir} (the BertModel config of HunyuanCLIP)")
    if not (tokenizer_dir / "vocab.txt").is_file():
        raise CheckpointError(f"vocab.txt is missing from {tokenizer_dir} (the BertTokenizer of HunyuanCLIP)")
    config = BertConfig.from_pretrained(encoder_dir)
    weight_file = clip_weight_file(encoder_dir)
    index = clip_index(weight_file)
    has_pooler = "pooler.dense.weight" in index
    with torch.device("meta"):
        expected = BertModel(config, add_pooling_layer=has_pooler).state_dict()
    check_keys({k: tuple(v.shape) for k, v in expected.items()}, index,
               f"the HunyuanCLIP BertModel of {encoder_dir / 'config.json'} ({config.num_hidden_layers} layers, "
               f"hidden {config.hidden_size})")
    # transformers reads the file we checked: it prefers model.safetensors as we do, and loads
    # pytorch_model.bin with weights_only=True.
    with _quiet_transformers():
        bert = BertModel.from_pretrained(encoder_dir, config=config, dtype=dtype, add_pooling_layer=has_pooler,
                                         use_safetensors=weight_file.name == SAFETENSORS_NAME, local_files_only=True)
    bert.to(device).eval().requires_grad_(False)
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return HunyuanClip(tokenizer, bert).eval()
