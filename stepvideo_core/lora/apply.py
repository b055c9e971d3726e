"""Putting adapters on a model for one run, and taking them off exactly.

The one entry point is :func:`attached`::

    with attached(model, adapters, blocks_on_device=k):   # adapters: iterable of LoraEntry
        ...run the model (BlockStreamer *inside* this block)...

Two ways a patch reaches the computation:

* **merge**: the update is added to the weight in place.  Full-precision weights are
  updated in fp32 and cast back; fp8 weights are dequantised, updated and re-quantised
  with fresh per-channel scales.  An exact copy of every touched tensor (fp8 bytes and
  scales included) is kept, and on exit it is *copied back* -- never subtracted -- so the
  base weights are bit-identical after any number of attach/detach cycles.
* **on the fly**: a forward hook on the layer adds ``strength * scale * (x A^T) B^T`` (or
  ``x D^T`` / a bias) to its output.  Weights are never touched, so it works for every op
  family (plain, scaled fp8, streamed blocks whose weights change tensor every call).
  Adapter tensors are copied to the input's device/dtype on first use and kept until exit.

``mode`` per entry: "merge", "on_the_fly", or "auto" = on the fly for fp8 layers and for
blocks that are streamed (index >= ``blocks_on_device``), merge otherwise -- unless the
exact backups that merging keeps would exceed ``merge_budget`` bytes (default 2 GiB; a
rank-32 LoRA on every layer of the 30B model would back up ~55 GB of bf16 weights), in
which case "auto" runs those layers on the fly too (about 1 % more compute, no copies).  Parameters
that are not Linear/Conv weights (norms, modulation tables) are always merged: they are
small, never fp8, and have no matmul to hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8
from ..checks import finite_float
from ..offload.kept import forget_changed
from .adapter import LoraAdapter, Patch, format_blocks
from .formats import LoraError
from .fuse import resolve_module

MODES = ("auto", "merge", "on_the_fly")
DEFAULT_MERGE_BUDGET = 2 << 30  # bytes of weight backups "auto" may keep for merges
_ACTIVE = "_stepvideo_lora_attachment"


def parse_blocks(text: Optional[str], num_blocks: int) -> Optional[frozenset]:
    """Block indices from a filter like "0-11,40" (empty/None = all: returns None).

    Raises ValueError for malformed parts or indices outside 0..num_blocks-1.
    """
    if text is None or not str(text).strip():
        return None
    chosen = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"block filter {text!r}: {part!r} is not a number or a range like 0-11") from None
        if lo > hi or lo < 0 or hi >= num_blocks:
            raise ValueError(f"block filter {text!r}: {part!r} is outside the model's blocks 0-{num_blocks - 1}")
        chosen.update(range(lo, hi + 1))
    return frozenset(chosen) if chosen else None


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One adapter as a model handle carries it: the adapter, its strength, mode and block filter.

    ``blocks`` None means every layer the adapter touches; a set keeps only patches
    inside those transformer blocks (layers outside the blocks are then left alone).
    """

    adapter: LoraAdapter
    strength: float = 1.0
    mode: str = "auto"
    blocks: Optional[frozenset] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown LoRA mode {self.mode!r}; expected one of {MODES}")
        # a NaN strength passes every comparison and would turn the whole video black
        object.__setattr__(self, "strength", finite_float(self.strength, "LoRA strength"))

    def selected(self) -> list[Patch]:
        """The adapter's patches that this entry applies (after the block filter; none at strength 0)."""
        if self.strength == 0:
            return []
        if self.blocks is None:
            return list(self.adapter.patches)
        return [p for p in self.adapter.patches if p.target.block in self.blocks]

    def describe(self) -> str:
        """One line: name, strength, mode, blocks."""
        where = "all blocks" if self.blocks is None else f"blocks {format_blocks(self.blocks)}"
        return f"{self.adapter.name} x{self.strength:g} ({self.mode}, {where})"


def _hookable(module: nn.Module, leaf: str) -> bool:
    """True when a patch on ``module.<leaf>`` can be applied to the layer's output instead."""
    if isinstance(module, nn.Conv2d):
        return leaf in ("weight", "bias") and module.groups == 1
    return isinstance(module, nn.Linear) and leaf in ("weight", "bias")


def _decide(mode: str, module: nn.Module, leaf: str, block: Optional[int], blocks_on_device: Optional[int]) -> str:
    """"merge" or "hook" for one patch (see module docstring)."""
    if not _hookable(module, leaf):
        return "merge"
    if mode == "merge":
        return "merge" if (leaf == "weight" or module.bias is not None) else "hook"
    if mode == "on_the_fly":
        return "hook"
    streamed = block is not None and blocks_on_device is not None and block >= blocks_on_device
    if getattr(module, "is_fp8", False) or streamed:
        return "hook"
    return "merge" if (leaf == "weight" or module.bias is not None) else "hook"


class _Hook:
    """Forward hook adding the on-the-fly patches of one layer to its output.

    Low-rank patches of a Linear layer are applied together as one low-rank update: their
    ``down`` matrices stacked into ``D`` [R, in] and their ``up`` matrices, scaled by
    ``scale * strength`` and placed in the rows their slot owns (zeros elsewhere), into ``U``
    [out, R].  A call then costs two GEMMs, ``h = x D^T`` and ``output += h U^T`` (``addmm_``,
    the addition inside the GEMM), whatever the number of patches: no full-size elementwise pass
    over the output, no temporary the size of the output.  Before, each patch multiplied its
    full-size delta by its scale and its strength and then added it (three passes over the
    output and five operations per patch, three patches on a split q/k/v LoRA), which cost far
    more than the rank-r products themselves.  Other patches (full differences, biases, Conv2d)
    go one by one.
    """

    def __init__(self, items: list):
        self.items = items            # (patch, strength)
        self.cache: dict = {}         # (index in items, device, dtype) -> tensors on that device
        self.stacked: dict = {}       # (device, dtype, rows) -> (D, U) of the Linear low-rank patches, or None

    def _tensors(self, index: int, patch: Patch, x: torch.Tensor) -> tuple:
        # keyed by position, not by id(patch): a torch.compile'd block (stepvideo_core.compile) then
        # guards on no object's identity, and every block shares one graph
        key = (index, x.device, x.dtype)
        found = self.cache.get(key)
        if found is None:
            found = tuple(t.to(device=x.device, dtype=x.dtype) for t in patch.tensors())
            self.cache[key] = found
        return found

    def _stack(self, x: torch.Tensor, rows: int) -> Optional[tuple]:
        """(D [R, in], U [rows, R]) on x's device and dtype for this layer's low-rank patches (made once),
        or None when it has none.  Built in fp32, so ``scale * strength`` is rounded once, into U."""
        key = (x.device, x.dtype, rows)
        if key in self.stacked:
            return self.stacked[key]
        lowrank = [(p, s) for p, s in self.items if p.kind == "lowrank"]
        found = None
        if lowrank:
            total = sum(p.rank for p, _ in lowrank)
            down = torch.cat([p.down.reshape(p.rank, -1).to(torch.float32) for p, _ in lowrank])
            up = torch.zeros(rows, total, dtype=torch.float32)
            first = 0
            for patch, strength in lowrank:
                columns = up[:, first:first + patch.rank]
                scaled = patch.up.reshape(-1, patch.rank).to(torch.float32) * (patch.scale * strength)
                slot = patch.target.slot
                if slot is None:
                    columns.copy_(scaled)
                else:  # the slot's rows of the fused output: [heads, head_dim, rank]
                    slot.of_weight(columns).copy_(scaled.unflatten(0, (-1, slot.head_dim)))
                first += patch.rank
            found = (down.to(device=x.device, dtype=x.dtype), up.to(device=x.device, dtype=x.dtype))
        self.stacked[key] = found
        return found

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        conv = isinstance(module, nn.Conv2d)
        stacked = None if conv else self._stack(x, output.shape[-1])
        if stacked is not None:
            down, up = stacked
            hidden = F.linear(x, down)
            if output.is_contiguous() and output.dtype == hidden.dtype:
                output.view(-1, output.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), up.t())
            else:
                output = output + F.linear(hidden, up).to(output.dtype)
        for index, (patch, strength) in enumerate(self.items):
            if stacked is not None and patch.kind == "lowrank":
                continue  # in the stacked update above
            delta = patch.output_delta(module, x, self._tensors(index, patch, x)).to(output.dtype) * strength
            slot = patch.target.slot
            if slot is None:
                output = output + delta
            elif conv:
                raise LoraError(f"{patch.target.describe()}: row slots apply to Linear layers only")
            else:
                view = slot.of_output(output)
                view.add_(delta.unflatten(-1, (-1, slot.head_dim)))
        return output


class _Saved:
    """An exact copy of one tensor slot (parameter or buffer) and where it was taken from."""

    def __init__(self, owner: nn.Module, name: str, backup_device: Optional[torch.device]):
        self.owner, self.name = owner, name
        self.is_param = name in owner._parameters
        self.original = self.current()
        device = backup_device if backup_device is not None else self.original.device
        self.backup = self.original.detach().to(device=device, copy=True)

    def current(self) -> torch.Tensor:
        return self.owner._parameters[self.name].data if self.is_param else self.owner._buffers[self.name]

    def restore(self) -> None:
        """Copy the backup into the tensor modified and, if something (a streamer pinning host memory)
        put another tensor in its place meanwhile, into that one too."""
        self.original.copy_(self.backup)
        now = self.current()
        moved = now.device != self.original.device or now.data_ptr() != self.original.data_ptr()
        if moved and now.shape == self.original.shape:
            now.copy_(self.backup)


class Attachment:
    """Adapters attached to one model; a context manager (see :func:`attached`).

    After entry, ``merged`` and ``hooked`` list the layers handled each way.
    """

    def __init__(self, model: nn.Module, adapters: Iterable, mode: Optional[str] = None,
                 blocks_on_device: Optional[int] = None, backup_device=None,
                 merge_budget: int = DEFAULT_MERGE_BUDGET):
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown LoRA mode {mode!r}; expected one of {MODES}")
        self.model = model
        self.merge_budget = merge_budget
        self.entries = [a if isinstance(a, LoraEntry) else LoraEntry(a) for a in adapters]
        self.mode = mode
        self.blocks_on_device = blocks_on_device
        self.backup_device = None if backup_device is None else torch.device(backup_device)
        self.merged: list[str] = []
        self.hooked: list[str] = []
        self._saved: list[_Saved] = []
        self._hooks: list = []
        self._hook_objects: list[_Hook] = []
        self._active = False

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> "Attachment":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- attach / detach -----------------------------------------------------------------
    def plan(self) -> tuple[dict, dict]:
        """(merge groups, hook groups): ``(module, leaf) -> [(patch, strength)]`` and
        ``module -> [(patch, strength)]``, after filters, mode decisions and the merge budget."""
        merges: dict = {}
        hooks: dict = {}
        auto_merged: dict = {}  # (module, leaf) -> (bytes an "auto" merge would back up, its items)
        for entry in self.entries:
            mode = self.mode or entry.mode
            for patch in entry.selected():
                target = patch.target
                try:
                    module = resolve_module(self.model, target)
                except AttributeError:
                    raise LoraError(f"LoRA {entry.adapter.name}: the model has no layer {target.module!r} "
                                    f"(the adapter was validated against another architecture)") from None
                how = _decide(mode, module, target.leaf, target.block, self.blocks_on_device)
                item = (patch, entry.strength)
                if how == "merge":
                    merges.setdefault((target.module, target.leaf), []).append(item)
                    if mode == "auto" and _hookable(module, target.leaf):
                        tensor = getattr(module, target.leaf)
                        size, items = auto_merged.get((target.module, target.leaf), (0, []))
                        items.append(item)
                        auto_merged[(target.module, target.leaf)] = (tensor.numel() * tensor.element_size(), items)
                else:
                    hooks.setdefault(target.module, []).append(item)
        if sum(size for size, _ in auto_merged.values()) > self.merge_budget:
            for key, (_, items) in auto_merged.items():  # too many backups: run them on the fly instead
                kept = [item for item in merges[key] if not any(item is moved for moved in items)]
                if kept:
                    merges[key] = kept
                else:
                    del merges[key]
                hooks.setdefault(key[0], []).extend(items)
        return merges, hooks

    def attach(self) -> None:
        """Merge and hook every patch; on any failure everything done so far is undone."""
        if self._active:
            return
        if attachment_of(self.model) is not None:
            raise RuntimeError("LoRA adapters are already attached to this model; detach them first "
                               "(two runs cannot share one model with different adapters at the same time)")
        merges, hooks = self.plan()
        setattr(self.model, _ACTIVE, self)
        self._active = True
        try:
            with torch.no_grad():
                for (module_name, leaf), items in merges.items():
                    self._merge(module_name, leaf, items)
            for module_name, items in hooks.items():
                module = self.model.get_submodule(module_name)
                hook = _Hook(items)
                self._hook_objects.append(hook)
                self._hooks.append(module.register_forward_hook(hook))
                self.hooked.append(module_name)
        except BaseException:
            self.detach()
            raise

    def _merge(self, module_name: str, leaf: str, items: list) -> None:
        """Add the updates of ``items`` to ``module.<leaf>`` (dequantise/re-quantise for fp8)."""
        module = self.model.get_submodule(module_name) if module_name else self.model
        is_fp8 = leaf == "weight" and getattr(module, "is_fp8", False)
        weight = self._save(module, leaf)
        if is_fp8:
            scale = self._save(module, "scale_weight")
            full = fp8.dequantize_weight(weight, scale, torch.float32)
        else:
            full = weight.to(torch.float32, copy=True)
        for patch, strength in items:
            slot = patch.target.slot
            region = full if slot is None else slot.of_weight(full)
            region.add_(patch.delta(tuple(region.shape), torch.float32, full.device), alpha=strength)
        if is_fp8:
            w8, new_scale = fp8.quantize_weight(full)
            weight.copy_(w8)
            scale.copy_(new_scale.reshape(scale.shape))
            forget_changed(self.model, [weight, scale])  # device copies kept between runs are stale now
        else:
            weight.copy_(full)
            forget_changed(self.model, [weight])
        self.merged.append(module_name if leaf == "weight" else f"{module_name}.{leaf}")

    def _save(self, module: nn.Module, name: str) -> torch.Tensor:
        """Back up ``module.<name>`` (once) and return the live tensor to modify."""
        saved = _Saved(module, name, self.backup_device)
        self._saved.append(saved)
        return saved.original

    def detach(self) -> None:
        """Remove hooks, copy every backup back, drop device copies of adapter tensors (idempotent)."""
        if not self._active:
            return
        try:
            for handle in self._hooks:
                handle.remove()
            with torch.no_grad():
                for saved in reversed(self._saved):
                    saved.restore()
                    forget_changed(self.model, [saved.original, saved.current()])
        finally:
            for hook in self._hook_objects:
                hook.cache.clear()
                hook.stacked.clear()
            self._hooks, self._hook_objects, self._saved = [], [], []
            self.merged, self.hooked = [], []
            if attachment_of(self.model) is self:
                delattr(self.model, _ACTIVE)
            self._active = False

    def summary(self) -> str:
        """One line: what is attached and how (for logs)."""
        if not self.entries:
            return "no LoRA"
        names = ", ".join(e.describe() for e in self.entries)
        return f"{names}: {len(self.merged)} tensors merged, {len(self.hooked)} layers on the fly"


def attachment_of(model: nn.Module) -> Optional[Attachment]:
    """The :class:`Attachment` active on ``model`` right now, or None (lets error messages say a LoRA is on)."""
    return getattr(model, _ACTIVE, None)


def attached(model: nn.Module, adapters: Sequence, mode: Optional[str] = None,
             blocks_on_device: Optional[int] = None, backup_device=None,
             merge_budget: int = DEFAULT_MERGE_BUDGET) -> Attachment:
    """Context manager applying ``adapters`` to ``model`` on entry and restoring the exact base weights on exit.

    * ``adapters``: :class:`LoraEntry` objects (a model handle's ``adapters`` tuple) or bare
      :class:`LoraAdapter` s (strength 1, auto).  Empty: does nothing.
    * ``mode``: overrides every entry's own mode ("auto", "merge", "on_the_fly") when given.
    * ``blocks_on_device``: the sampler's streaming plan; blocks at or past it count as
      streamed for "auto" (None = all resident).
    * ``backup_device``: where exact copies of merged tensors wait (default: beside the
      tensor; pass "cpu" to keep backups of GPU-resident weights out of VRAM).
    * ``merge_budget``: bytes of backups "auto" may keep; beyond it "auto" hooks instead.

    Restores on normal exit, exceptions and interrupts (BaseException) alike.  Enter it
    *outside* :class:`~stepvideo_core.offload.BlockStreamer`, so merges land in the home
    copies the streamer reads from.  Raises RuntimeError when adapters are already
    attached to ``model``.
    """
    return Attachment(model, adapters, mode, blocks_on_device, backup_device, merge_budget)
