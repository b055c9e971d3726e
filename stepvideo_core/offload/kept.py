"""Resident weights kept on the compute device between runs, until someone releases them.

A :class:`~stepvideo_core.offload.streamer.BlockStreamer` run puts the model's *resident* tensors
(everything but the streamed blocks) on the device.  Without a :class:`KeptWeights` it uploads
them on entry and drops them on exit, so a run with every block resident moves the whole model
(~60 GB at bf16) before its first step, every run.  Given one, the streamer takes the copies it
finds there (no copy at all on the second run) and leaves the ones it uploaded there; the model
itself still points at its home (host) tensors outside a run, as always.

Whoever keeps them must be able to give the memory back: :meth:`KeptWeights.release` drops every
device copy (the home copies never left the host, so nothing is copied back).  In ComfyUI the
sampler node registers them with ComfyUI's model management (nodes/comfy_bridge/models.py), so loading
another model, "unload models" or ``free_memory`` evicts them like any model; a host without such
an owner (the CLI, scripts) passes none and uploads per run.

A kept copy is used only while its home tensor is the very same memory (same data pointer,
shape, strides and dtype; the entry holds the home tensor, so the memory cannot be reused
meanwhile).  Code that writes *into* a home tensor in place must say so with :meth:`forget`
(the LoRA merge of :mod:`stepvideo_core.lora.apply` does, when it merges and when it restores).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import nn

_ATTRIBUTE = "_stepvideo_kept_weights"


@dataclass(eq=False)
class _Entry:
    owner: "weakref.ref[nn.Module]"
    home: torch.Tensor      # the home tensor the copy was made from (held: its memory stays this tensor's)
    copy: torch.Tensor      # the device copy

    def matches(self, owner: nn.Module, home: torch.Tensor) -> bool:
        mine = self.home
        return (self.owner() is owner and home.data_ptr() == mine.data_ptr() and home.dtype == mine.dtype
                and home.shape == mine.shape and home.stride() == mine.stride() and home.device == mine.device)


class KeptWeights:
    """Device copies of one model's resident tensors, kept between runs (see the module docstring).

    Keys are (owner module, tensor name); ``device`` is where the copies live.  ``uploads`` counts
    the copies made and ``releases`` the calls of :meth:`release` that dropped something (diagnostics).
    """

    def __init__(self, device: Union[str, torch.device]):
        self.device = torch.device(device)
        self._entries: dict[tuple[int, str], _Entry] = {}
        self.uploads = 0
        self.releases = 0

    # -- what a run does -------------------------------------------------------------------
    def take(self, owner: nn.Module, name: str, home: torch.Tensor) -> Optional[torch.Tensor]:
        """The kept device copy of ``owner.<name>`` made from ``home``, or None (a stale entry is dropped)."""
        key = (id(owner), name)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.matches(owner, home):
            del self._entries[key]
            return None
        return entry.copy

    def keep(self, owner: nn.Module, name: str, home: torch.Tensor, copy: torch.Tensor) -> None:
        """Remember ``copy`` (on :attr:`device`) as the device copy of ``owner.<name>``'s ``home``."""
        self._entries[(id(owner), name)] = _Entry(weakref.ref(owner), home, copy)
        self.uploads += 1

    def retain(self, keys: Iterable[tuple[nn.Module, str]]) -> int:
        """Drop every copy but those of ``keys`` ((owner, name) pairs, e.g. a run's resident tensors); bytes dropped.

        Exists so that blocks a new plan streams (or tensors now living on the device themselves)
        do not keep a second, unused device copy.
        """
        wanted = {(id(owner), name) for owner, name in keys}
        gone = [key for key in self._entries if key not in wanted]
        return self._drop(gone)

    # -- what the owner of the memory does ---------------------------------------------------
    def release(self) -> int:
        """Drop every device copy (the memory goes back to the allocator); returns the bytes dropped."""
        dropped = self._drop(list(self._entries))
        if dropped:
            self.releases += 1
        return dropped

    def forget(self, tensors: Iterable[torch.Tensor]) -> int:
        """Drop the copies made from any of ``tensors`` (home tensors changed in place); returns the bytes dropped."""
        ptrs = {t.data_ptr() for t in tensors}
        return self._drop([key for key, entry in self._entries.items() if entry.home.data_ptr() in ptrs])

    # -- numbers ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the device copies held now."""
        return sum(entry.copy.nbytes for entry in self._entries.values())

    @property
    def count(self) -> int:
        """Device copies held now."""
        return len(self._entries)

    def copies(self) -> list[torch.Tensor]:
        """The device copies held now (for tests and diagnostics)."""
        return [entry.copy for entry in self._entries.values()]

    def _drop(self, keys: list) -> int:
        dropped = 0
        for key in keys:
            dropped += self._entries.pop(key).copy.nbytes
        return dropped

    def __repr__(self) -> str:
        return f"KeptWeights({self.device}, {self.count} tensors, {self.nbytes / 2**30:.2f} GiB)"


def kept_weights(model: nn.Module, device: Union[str, torch.device]) -> KeptWeights:
    """The :class:`KeptWeights` of ``model`` (made on first use, held by the model); its device becomes ``device``.

    Held by the model so that everything that changes the model's weights finds it
    (:func:`kept_weights_of`).  When ``device`` differs from the copies' device they are released first.
    """
    device = torch.device(device)
    kept = kept_weights_of(model)
    if kept is None:
        kept = KeptWeights(device)
        object.__setattr__(model, _ATTRIBUTE, kept)  # a plain attribute: no state_dict, no .to()
    elif kept.device != device:
        kept.release()
        kept.device = device
    return kept


def kept_weights_of(model: nn.Module) -> Optional[KeptWeights]:
    """``model``'s :class:`KeptWeights`, or None when it never kept any."""
    return getattr(model, _ATTRIBUTE, None)


def forget_changed(model: nn.Module, tensors: Iterable[torch.Tensor]) -> int:
    """Tell ``model``'s kept weights (if any) that ``tensors`` were changed in place; returns the bytes dropped."""
    kept = kept_weights_of(model)
    return 0 if kept is None else kept.forget(tensors)


def resident_bytes(model: nn.Module, blocks_on_device: Optional[int], device: Union[str, torch.device]) -> int:
    """Bytes a run with ``blocks_on_device`` (None = all) places on ``device`` beyond what already lives there:
    every parameter and buffer except those of the streamed blocks, whose home is elsewhere."""
    device = torch.device(device)
    blocks = list(getattr(model, "transformer_blocks", ()))
    keep = len(blocks) if blocks_on_device is None else max(0, min(int(blocks_on_device), len(blocks)))
    streamed = {id(t) for block in blocks[keep:] for t in (*block.parameters(), *block.buffers())}
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers())
               if id(t) not in streamed and t.device != device)
