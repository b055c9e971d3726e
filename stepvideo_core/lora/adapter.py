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

from dataclasses import dataclass
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
    return (f"{key}: shape {list(found)} does not fit {target.describe()}, which expects {list(expected)}")


def _bind_group(group: KeyGroup, adapter: AdapterFile, table: TargetTable, model: nn.Module,
                patches: list, matched: list, unmatched: list, mismatches: list) -> None:
    """Turn one trainer module's tensors into patches (or unmatched entries / shape mismatches)."""
    keys = group.keys
    target, reason = table.lookup(group.name, group.underscored)
    if target is None:
        unmatched.extend((k, reason) for k in keys.values())
        return
    module = resolve_module(model, target)
    tensors = adapter.tensors
    if "down" in keys or "up" in keys:
        if not ("down" in keys and "up" in keys):
            have = "down (lora_A/lora_down)" if "down" in keys else "up (lora_B/lora_up)"
            unmatched.extend((keys[k], f"only the {have} half of a LoRA pair")
                             for k in ("down", "up", "alpha") if k in keys)
        elif target.leaf != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            unmatched.extend((keys[k], f"LoRA on {target.describe()}, which is not a Linear/Conv layer")
                             for k in ("down", "up", "alpha") if k in keys)
        else:
            down, up = tensors[keys["down"]], tensors[keys["up"]]
            shape = target_shape(model, target)
            rank = down.shape[0]
            if rank == 0:
                mismatches.append(f"{keys['down']}: rank 0 (an empty LoRA pair)")
                return
            want_down = (rank,) + shape[1:]
            want_up = (shape[0], rank) + (1,) * (len(shape) - 2)
            if tuple(down.shape) != want_down:
                mismatches.append(_shape_error(keys["down"], down.shape, target, want_down))
            elif tuple(up.shape) != want_up:
                mismatches.append(_shape_error(keys["up"], up.shape, target, want_up))
            else:
                if "alpha" in keys:
                    alpha = tensor_scalar(tensors[keys["alpha"]])
                else:
                    alpha = peft_alpha(adapter.config, group.name, rank)
                scale = 1.0 if alpha is None else alpha / rank
                used = tuple(keys[k] for k in ("down", "up", "alpha") if k in keys)
                patches.append(Patch(target, "lowrank", used, down=down, up=up, scale=scale))
                matched.extend(used)
    elif "alpha" in keys:
        unmatched.append((keys["alpha"], "alpha without lora_down/lora_up"))
    if "diff" in keys:
        diff = tensors[keys["diff"]]
        shape = target_shape(model, target)
        if tuple(diff.shape) != shape:
            mismatches.append(_shape_error(keys["diff"], diff.shape, target, shape))
        else:
            patches.append(Patch(target, "diff", (keys["diff"],), diff=diff))
            matched.append(keys["diff"])
    if "diff_b" in keys:
        diff_b = tensors[keys["diff_b"]]
        rows = target_shape(model, target)[0] if target.leaf == "weight" else None
        if target.leaf != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            unmatched.append((keys["diff_b"], f"bias difference for {target.describe()}, which has no bias"))
        elif tuple(diff_b.shape) != (rows,):
            mismatches.append(_shape_error(keys["diff_b"], diff_b.shape, target, (rows,)))
        elif isinstance(module, nn.LayerNorm) and module.bias is None:
            unmatched.append((keys["diff_b"], f"bias difference for {target.describe()}, which has no bias"))
        else:
            bias_target = Target(target.module, "bias", target.slot)
            patches.append(Patch(bias_target, "bias", (keys["diff_b"],), diff=diff_b))
            matched.append(keys["diff_b"])


def bind_adapter(adapter: AdapterFile, model: nn.Module, name: Optional[str] = None) -> LoraAdapter:
    """Match ``adapter`` against ``model``; returns a :class:`LoraAdapter`.

    Raises :class:`LoraError` when any shape does not fit (naming key and both shapes)
    or when nothing matches (with a guess of what the file is for).
    """
    table = TargetTable(model)
    patches, matched, mismatches = [], [], []
    unmatched = [(k, f"unsupported: {why}") for k, why in adapter.unsupported] + list(adapter.unknown)
    for group in adapter.groups.values():
        _bind_group(group, adapter, table, model, patches, matched, unmatched, mismatches)
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
