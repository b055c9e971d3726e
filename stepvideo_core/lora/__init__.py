"""LoRA and difference adapters for the Step-Video DiT: read, validate, apply, extract.

* :func:`load_lora` -- read a file (PEFT/diffusers, kohya/musubi, ComfyUI-style, ``.diff``)
  and validate it against a model; returns a :class:`LoraAdapter` with a :meth:`~LoraAdapter.report`.
* :class:`LoraEntry` -- an adapter with strength, mode and block filter (what a model handle carries).
* :func:`attached` -- context manager: adapters on for one run, exact base weights back afterwards.
* :func:`extract_lora` -- a LoRA from the difference of two checkpoints (``python -m stepvideo_core.lora extract``).
"""

from .adapter import LoraAdapter, Patch, bind_adapter, format_blocks, load_lora
from .apply import MODES, Attachment, LoraEntry, attached, parse_blocks
from .extract import extract_lora
from .formats import LoraError, read_adapter
from .fuse import Slot, Target, TargetTable

__all__ = ["LoraAdapter", "LoraEntry", "LoraError", "Attachment", "MODES", "Patch", "Slot", "Target", "TargetTable",
           "attached", "bind_adapter", "extract_lora", "format_blocks", "load_lora", "parse_blocks", "read_adapter"]
