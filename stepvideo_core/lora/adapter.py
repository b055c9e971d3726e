"""An adapter bound to a model: every tensor of the file matched to a DiT tensor (or reported why not).

:func:`load_lora` reads a file (:mod:`.formats`), resolves each trainer module name
against the model (:mod:`.fuse`), checks every shape, and returns a
:class:`LoraAdapter` whose :class:`Patch` es say exactly what changes where.  This
happens at load time, so an adapter that matches nothing fails in the loader, not
halfway through sampling.

A patch's update is ``strength * scale * up @ down`` (low rank, ``scale = alpha / rank``),
``strength * diff`` (full difference) or ``strength * diff_b`` (bias difference),
added to its target tensor -- to the slot rows only when the target is one of q/k/v
inside a fused projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .formats import AdapterFile, KeyGroup, LoraError, peft_alpha, read_adapter, tensor_scalar
from .fuse import Target, TargetTable, resolve_module, target_shape

SHOW = 5  # names listed in reports and errors


@dataclass(frozen=True, eq=False)
class Patch:
    """One change to one target: ``kind`` "lowrank" (down, up, scale), "diff" (weight) or "bias".

    ``keys`` are the stored tensor names it came from (for reports).  Tensors stay as
    stored (usually bf16, on the CPU); every use casts them.
    """

    target: Target
    kind: str
    keys: tuple
    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    diff: Optional[torch.Tensor] = None
    scale: float = 1.0

    @property
    def rank(self) -> int:
        """Rank of a low-rank patch (0 for differences)."""
        return int(self.down.shape[0]) if self.kind == "lowrank" else 0

    def delta(self, shape: tuple, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The full update (without strength) shaped ``shape`` -- the target region -- in ``dtype``.

        Exists for merging: low rank is multiplied out here (conv kernels flattened to 2-D).
        """
        if self.kind != "lowrank":
            return self.diff.to(device=device, dtype=dtype).reshape(shape)
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        return (up @ down).mul_(self.scale).reshape(shape)

    def output_delta(self, module: nn.Module, x: torch.Tensor, tensors: tuple) -> torch.Tensor:
        """What this patch adds to ``module(x)``'s output (slot channels only), without strength.

        ``tensors`` are this patch's tensors already on ``x``'s device and dtype.  Exists for
        the on-the-fly mode: the low-rank product is never formed, only ``(x A^T) B^T``.
        """
        conv = isinstance(module, nn.Conv2d)
        if self.kind == "bias":
            (bias,) = tensors
            return bias[:, None, None] if conv else bias
        if self.kind == "diff":
            (diff,) = tensors
            if conv:
                return F.conv2d(x, diff, None, module.stride, module.padding, module.dilation)
            return F.linear(x, diff)
        down, up = tensors
        if conv:
            hidden = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
            return F.conv2d(hidden, up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale

    def tensors(self) -> tuple:
        """The tensors :meth:`output_delta` needs (before moving them to the input's device)."""
        return (self.diff,) if self.kind in ("diff", "bias") else (self.down, self.up)


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A validated adapter for one model architecture (shapes checked against it).

    ``matched`` lists the stored keys used; ``unmatched`` lists ``(key, reason)`` for the
    others.  ``format`` says what was detected.  Tensors are shared, never copied, by
    every handle that uses the adapter.
    """

    name: str
    source: Path
    format: str
    patches: tuple
    matched: tuple
    unmatched: tuple
    num_blocks: int

    def blocks(self) -> list[int]:
        """Transformer blocks this adapter touches, sorted."""
        return sorted({p.target.block for p in self.patches if p.target.block is not None})

    def report(self) -> str:
        """Multi-line report: format, matched count, unmatched keys (first few) and where it applies."""
        ranks = sorted({p.rank for p in self.patches if p.kind == "lowrank"})
        blocks = self.blocks()
        lines = [f"LoRA {self.name}: {self.format}",
                 f"{len(self.matched)} of {len(self.matched) + len(self.unmatched)} tensors matched, "
                 f"{len(self.patches)} patches on {len({p.target.module for p in self.patches})} layers"
                 + (f", rank {'/'.join(map(str, ranks))}" if ranks else "")]
        if blocks:
            lines.append(f"blocks {format_blocks(blocks)} of 0-{self.num_blocks - 1}")
        if self.unmatched:
            shown = "; ".join(f"{k} ({why})" for k, why in self.unmatched[:SHOW])
            more = f" and {len(self.unmatched) - SHOW} more" if len(self.unmatched) > SHOW else ""
            lines.append(f"NOT matched: {shown}{more}")
        return "\n".join(lines)


def format_blocks(blocks) -> str:
    """Sorted block indices as ranges, e.g. [0, 1, 2, 5] -> "0-2,5"."""
    blocks = sorted(set(blocks))
    runs, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            runs.append(f"{start}" if start == b else f"{start}-{b}")
            start = None
    return ",".join(runs)


def _shape_error(key: str, found, target: Target, expected) -> str:
    """The mismatch message for stored tensor ``key``: its shape, the target, and the shape that fits."""
    return (f"{key}: shape {list(found)} does not fit {target.describe()}, which expects {list(expected)}")


PAIR_KINDS = ("down", "up", "alpha")  # the stored tensors of one LoRA pair
LORA_LAYERS = (nn.Linear, nn.Conv2d)  # layers a low-rank pair can change
BIASED_LAYERS = (nn.Linear, nn.Conv2d, nn.LayerNorm)  # layers a bias difference can change


@dataclass
class _Binding:
    """What binding an adapter has found so far, group by group.

    ``patches`` and the ``matched`` keys they use; ``unmatched`` (key, reason) pairs left
    out of the adapter (reported); ``mismatches`` shape errors (any one refuses the file).
    """

    unmatched: list
    patches: list = field(default_factory=list)
    matched: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)

    def use(self, patch: Patch) -> None:
        """Keep ``patch`` and count its stored keys as matched."""
        self.patches.append(patch)
        self.matched.extend(patch.keys)

    def skip(self, keys, reason: str) -> None:
        """Leave the stored ``keys`` out of the adapter, each reported with ``reason``."""
        self.unmatched.extend((key, reason) for key in keys)


def _lora_scale(group: KeyGroup, adapter: AdapterFile, rank: int) -> float:
    """``alpha / rank`` of a pair: alpha stored with it, else from the PEFT config; 1.0 without any alpha."""
    keys = group.keys
    if "alpha" in keys:
        alpha = tensor_scalar(adapter.tensors[keys["alpha"]])
    else:
        alpha = peft_alpha(adapter.config, group.name, rank)
    return 1.0 if alpha is None else alpha / rank


def _pair_shape_error(keys: dict, down: torch.Tensor, up: torch.Tensor, target: Target,
                      shape: tuple) -> Optional[str]:
    """The error for the first of ``down``/``up`` whose shape does not fit a target region ``shape``; None if both fit.

    ``down`` must be [rank, *shape[1:]] and ``up`` [shape[0], rank, 1, ...] (1s for conv kernels).
    """
    rank = down.shape[0]
    want_down = (rank,) + shape[1:]
    want_up = (shape[0], rank) + (1,) * (len(shape) - 2)
    if tuple(down.shape) != want_down:
        return _shape_error(keys["down"], down.shape, target, want_down)
    if tuple(up.shape) != want_up:
        return _shape_error(keys["up"], up.shape, target, want_up)
    return None


def _bind_pair(group: KeyGroup, adapter: AdapterFile, target: Target, module: nn.Module, model: nn.Module,
               found: _Binding) -> bool:
    """Bind the LoRA pair (down, up and maybe alpha) of ``group`` to ``target`` as a low-rank patch.

    A half pair, or a pair on anything but a Linear/Conv weight, is left unmatched; a shape
    that does not fit is a mismatch.  Returns False only for an empty (rank 0) pair: the
    file is refused for it, and the group's other tensors are not checked.
    """
    keys = group.keys
    stored = tuple(keys[k] for k in PAIR_KINDS if k in keys)
    if not ("down" in keys and "up" in keys):
        have = "down (lora_A/lora_down)" if "down" in keys else "up (lora_B/lora_up)"
        found.skip(stored, f"only the {have} half of a LoRA pair")
        return True
    if target.leaf != "weight" or not isinstance(module, LORA_LAYERS):
        found.skip(stored, f"LoRA on {target.describe()}, which is not a Linear/Conv layer")
        return True
    down, up = adapter.tensors[keys["down"]], adapter.tensors[keys["up"]]
    rank = down.shape[0]
    if rank == 0:
        found.mismatches.append(f"{keys['down']}: rank 0 (an empty LoRA pair)")
        return False
    error = _pair_shape_error(keys, down, up, target, target_shape(model, target))
    if error:
        found.mismatches.append(error)
    else:
        found.use(Patch(target, "lowrank", stored, down=down, up=up, scale=_lora_scale(group, adapter, rank)))
    return True


def _bind_diff(key: str, diff: torch.Tensor, target: Target, model: nn.Module, found: _Binding) -> None:
    """Bind a full difference (``<module>.diff``) to ``target``, or record its shape mismatch."""
    shape = target_shape(model, target)
    if tuple(diff.shape) != shape:
        found.mismatches.append(_shape_error(key, diff.shape, target, shape))
    else:
        found.use(Patch(target, "diff", (key,), diff=diff))


def _bind_bias_diff(key: str, diff_b: torch.Tensor, target: Target, module: nn.Module, model: nn.Module,
                    found: _Binding) -> None:
    """Bind a bias difference (``<module>.diff_b``) to the bias of ``target``'s layer.

    Left unmatched when that layer has no bias (not a Linear/Conv/LayerNorm weight, or a
    LayerNorm without one); a length other than the layer's rows is a mismatch.
    """
    no_bias = f"bias difference for {target.describe()}, which has no bias"
    if target.leaf != "weight" or not isinstance(module, BIASED_LAYERS):
        found.skip((key,), no_bias)
        return
    rows = target_shape(model, target)[0]
    if tuple(diff_b.shape) != (rows,):
        found.mismatches.append(_shape_error(key, diff_b.shape, target, (rows,)))
    elif isinstance(module, nn.LayerNorm) and module.bias is None:
        found.skip((key,), no_bias)
    else:
        found.use(Patch(Target(target.module, "bias", target.slot), "bias", (key,), diff=diff_b))


def _bind_group(group: KeyGroup, adapter: AdapterFile, table: TargetTable, model: nn.Module,
                found: _Binding) -> None:
    """Turn one trainer module's tensors into patches, unmatched entries or shape mismatches in ``found``.

    Steps: resolve the module name to a target (else every tensor is unmatched), then bind
    its LoRA pair, its full difference and its bias difference, each on its own.
    """
    keys = group.keys
    target, reason = table.lookup(group.name, group.underscored)
    if target is None:
        found.skip(keys.values(), reason)
        return
    module = resolve_module(model, target)
    if "down" in keys or "up" in keys:
        if not _bind_pair(group, adapter, target, module, model, found):
            return
    elif "alpha" in keys:
        found.skip((keys["alpha"],), "alpha without lora_down/lora_up")
    if "diff" in keys:
        _bind_diff(keys["diff"], adapter.tensors[keys["diff"]], target, model, found)
    if "diff_b" in keys:
        _bind_bias_diff(keys["diff_b"], adapter.tensors[keys["diff_b"]], target, module, model, found)


def bind_adapter(adapter: AdapterFile, model: nn.Module, name: Optional[str] = None) -> LoraAdapter:
    """Match ``adapter`` against ``model``; returns a :class:`LoraAdapter`.

    Raises :class:`LoraError` when any shape does not fit (naming key and both shapes)
    or when nothing matches (with a guess of what the file is for).
    """
    table = TargetTable(model)
    found = _Binding(unmatched=[(k, f"unsupported: {why}") for k, why in adapter.unsupported] + list(adapter.unknown))
    for group in adapter.groups.values():
        _bind_group(group, adapter, table, model, found)
    patches, matched, unmatched, mismatches = found.patches, found.matched, found.unmatched, found.mismatches
    label = name or adapter.source.name
    if mismatches:
        more = f" (and {len(mismatches) - SHOW} more)" if len(mismatches) > SHOW else ""
        raise LoraError(f"LoRA {label} does not fit this Step-Video DiT (width "
                        f"{getattr(getattr(model, 'config', None), 'inner_dim', '?')}): "
                        + "; ".join(mismatches[:SHOW]) + more
                        + ". It was probably trained for another model or model size.")
    if not patches:
        shown = "; ".join(f"{k} ({why})" for k, why in unmatched[:SHOW])
        raise LoraError(f"LoRA {label} matched none of its {len(adapter.tensors)} tensors to the Step-Video DiT "
                        f"(detected format: {adapter.format_name()}). First keys: {shown}. "
                        f"It is probably an adapter for another model.")
    return LoraAdapter(name=label, source=adapter.source, format=adapter.format_name(), patches=tuple(patches),
                       matched=tuple(matched), unmatched=tuple(unmatched), num_blocks=table.num_blocks)


def load_lora(path, model: nn.Module, name: Optional[str] = None) -> LoraAdapter:
    """Read the adapter at ``path`` (file, or PEFT folder) and validate it against ``model``.

    ``model`` may be the loaded DiT or the same architecture on the meta device: only
    module names and shapes are used.  Returns a :class:`LoraAdapter`; raises
    :class:`LoraError` for pickles, DoRA/unreadable files, shape mismatches and
    adapters that match nothing.
    """
    return bind_adapter(read_adapter(path), model, name)
