"""Which tensor of the DiT -- and which rows of it -- a trainer's module name means.

Our modules carry the official checkpoint names.  Trainers often name the same
layers differently, and some of them train separate q/k/v projections where the
DiT has fused ones.  This module builds the table that resolves every accepted
name to a :class:`Target`: the DiT module whose weight changes, plus a
:class:`Slot` when only the rows of one of q/k/v are meant.

Fused layouts (reference section 2.3, head_dim 128, H heads):

* ``attn1.wqkv`` [3D, D]: rows are grouped per head, ``[q_h | k_h | v_h]``, i.e. the
  output viewed as [H, 3, 128]; q of head h is rows [384h, 384h+128).
* ``attn2.wkv`` [2D, D]: ``[k_h | v_h]`` per head, viewed as [H, 2, 128].

A split projection (``to_k``: [D, D], head h at rows [128h, 128h+128)) therefore
lands in the fused weight as ``W.view(H, parts, 128, D)[:, index] += dW.view(H, 128, D)``
-- that is all a :class:`Slot` does, for weights and for layer outputs alike.

Accepted names inside block ``N`` (``transformer_blocks.N`` or ``blocks.N``):

=============================  =========================================================
self-attention module           ``attn1``, ``self_attn``, ``attn``
cross-attention module          ``attn2``, ``cross_attn``, ``attn_2``
q / k / v (split)               ``to_q``/``to_k``/``to_v``, ``q_proj``/``k_proj``/``v_proj``,
                                ``wq``/``wk``/``wv``, ``q``/``k``/``v``
fused (our layout only)         ``attn1.wqkv``, ``attn2.wkv``
output projection               ``wo``, ``to_out.0``, ``o_proj``, ``out_proj``, ``o``
feed-forward                    ``ff.net.0.proj``, ``ff.net.2``
=============================  =========================================================

Everything else (norms, modulation tables, projections outside the blocks) is
accepted under its own module or parameter name.  Names such as ``to_qkv`` or
``qkv`` are *not* accepted: trainers usually stack all q rows, then all k rows,
then all v rows, which is not our head-interleaved layout, and guessing would
apply a silently wrong update.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

BLOCK_PREFIXES = ("transformer_blocks", "blocks")
SELF_ATTENTION = ("attn1", "self_attn", "attn")
CROSS_ATTENTION = ("attn2", "cross_attn", "attn_2")
SPLIT_NAMES = {
    "q": ("to_q", "q_proj", "wq", "q"),
    "k": ("to_k", "k_proj", "wk", "k"),
    "v": ("to_v", "v_proj", "wv", "v"),
}
OUT_NAMES = ("wo", "to_out.0", "o_proj", "out_proj", "o")
FUSED_PARTS = {"wqkv": ("q", "k", "v"), "wkv": ("k", "v")}


@dataclass(frozen=True)
class Slot:
    """The rows of a head-interleaved fused projection that belong to one of q/k/v.

    The layer's output (and its weight's rows) is viewed as [heads, parts, head_dim];
    this slot is ``[:, index, :]``.  ``name`` is "q", "k" or "v" (for messages).
    """

    name: str
    parts: int
    index: int
    head_dim: int

    def rows(self, fused_rows: int) -> int:
        """Number of rows this slot covers in a fused layer with ``fused_rows`` rows."""
        return fused_rows // self.parts

    def of_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A view [heads, head_dim, *rest] of this slot's rows of a fused ``weight`` [rows, *rest]."""
        shaped = weight.unflatten(0, (-1, self.parts, self.head_dim))
        return shaped.select(1, self.index)

    def of_output(self, out: torch.Tensor) -> torch.Tensor:
        """A view [..., heads, head_dim] of this slot's channels of a fused layer's output [..., rows]."""
        shaped = out.unflatten(-1, (-1, self.parts, self.head_dim))
        return shaped.select(-2, self.index)

    def runs(self, fused_rows: int) -> list[tuple[int, int]]:
        """(first row, row count) of every contiguous run of this slot's rows in a fused layer of ``fused_rows`` rows.

        One run per head: head h owns rows ``[(h * parts + index) * head_dim, ... + head_dim)``,
        which are rows ``[h * head_dim, ... + head_dim)`` of the split projection.  The same rows
        as :meth:`of_weight`, for patch formats that address rows only as contiguous ranges
        (ComfyUI's ``(dim, offset, size)`` slices).
        """
        heads = fused_rows // (self.parts * self.head_dim)
        return [((h * self.parts + self.index) * self.head_dim, self.head_dim) for h in range(heads)]

    def describe(self) -> str:
        """E.g. "k rows (head-interleaved, 2 parts)" for messages."""
        return f"{self.name} rows of the head-interleaved fused layer"


@dataclass(frozen=True)
class Target:
    """A tensor a patch changes: module ``module`` (qualified name), its parameter ``leaf``
    ("weight" for LoRA and ``.diff``; other parameters only through ``.diff``), optionally a slot."""

    module: str
    leaf: str = "weight"
    slot: Optional[Slot] = None

    @property
    def tensor_name(self) -> str:
        """The state-dict name (relative to the DiT) of the tensor this target changes, e.g. "proj_out.weight"."""
        return f"{self.module}.{self.leaf}" if self.module else self.leaf

    @property
    def block(self) -> Optional[int]:
        """Transformer block index, or None for layers outside the blocks."""
        parts = self.module.split(".")
        if len(parts) > 1 and parts[0] == "transformer_blocks" and parts[1].isdigit():
            return int(parts[1])
        return None

    def describe(self) -> str:
        """Human description: module (and slot) for messages and reports."""
        where = self.module if self.leaf == "weight" else f"{self.module}.{self.leaf}"
        return where if self.slot is None else f"{where} ({self.slot.describe()})"


# (accepted spellings, real module, fused projection) of each attention of a block
ATTENTIONS = ((SELF_ATTENTION, "attn1", "wqkv"), (CROSS_ATTENTION, "attn2", "wkv"))


def _split_target(attention: str, fused: str, part: str, head_dim: int) -> Target:
    """The target of a split ``part`` ("q", "k" or "v") projection of the attention module ``attention``.

    Returns the slot of the fused projection that holds ``part``; a part the fused layer
    lacks (cross-attention q) is a layer of its own, ``wq``.
    """
    parts = FUSED_PARTS[fused]
    if part not in parts:
        return Target(f"{attention}.wq")
    return Target(f"{attention}.{fused}", slot=Slot(part, len(parts), parts.index(part), head_dim))


def _attention_aliases(alias: str, attention: str, fused: str, head_dim: int) -> Iterator[tuple[str, Target]]:
    """(name, target) for the projections of one spelling ``alias`` of the attention module ``attention``.

    Yields the fused projection under its own name, the output projection under every
    :data:`OUT_NAMES` spelling and each split q/k/v projection under every
    :data:`SPLIT_NAMES` spelling.
    """
    yield f"{alias}.{fused}", Target(f"{attention}.{fused}")
    for out in OUT_NAMES:
        yield f"{alias}.{out}", Target(f"{attention}.wo")
    for part, names in SPLIT_NAMES.items():
        target = _split_target(attention, fused, part, head_dim)
        for name in names:
            yield f"{alias}.{name}", target


def _layer_aliases(here: str, base: str, block: nn.Module) -> Iterator[tuple[str, Target]]:
    """(name, target) for the block's weighted layers other than the attention projections.

    ``here`` is the block as the file spells it, ``base`` its real name.  Layers outside
    the attention modules keep their own names; the attention q/k norms are accepted
    under every spelling of their attention module.
    """
    spellings = {real: names for names, real, _ in ATTENTIONS}
    for sub, module in block.named_modules():
        if "weight" not in module._parameters:
            continue
        if not sub.startswith(("attn1.", "attn2.")):
            yield f"{here}.{sub}", Target(f"{base}.{sub}")
        elif sub.endswith("_norm"):  # q_norm / k_norm under every attention alias
            real, norm = sub.split(".")
            for attn in spellings[real]:
                yield f"{here}.{attn}.{norm}", Target(f"{base}.{sub}")


def _block_aliases(index: int, block: nn.Module) -> Iterator[tuple[str, Target]]:
    """(alias name relative to the model, target) for every tensor of block ``index``.

    For each block spelling (:data:`BLOCK_PREFIXES`): the attention projections, the other
    weighted layers, then the block's own parameters (the modulation table).
    """
    base = f"transformer_blocks.{index}"
    head_dim = block.attn1.head_dim
    for prefix in BLOCK_PREFIXES:
        here = f"{prefix}.{index}"
        for names, real, fused in ATTENTIONS:
            for attn in names:
                yield from _attention_aliases(f"{here}.{attn}", f"{base}.{real}", fused, head_dim)
        yield from _layer_aliases(here, base, block)
        for name, _ in block.named_parameters(recurse=False):
            yield f"{here}.{name}", Target(base, leaf=name)


def _outer_targets(model: nn.Module) -> Iterator[tuple[str, Target]]:
    """(name, target) for every tensor outside the transformer blocks, under its own name.

    A module's weight is named by the module (as LoRA keys name it); its other parameters
    by ``<module>.<leaf>``, except biases, which change through ``<module>.diff_b``.  The
    model's own parameters (no module) are named by the leaf alone.
    """
    blocks = getattr(model, "transformer_blocks", None)
    block_ids = {id(b) for b in blocks} if blocks is not None else set()
    for name, module in model.named_modules():
        if not name or id(module) in block_ids or name == "transformer_blocks":
            continue
        if name.startswith("transformer_blocks."):
            continue  # block internals come from _block_aliases
        for leaf, _ in module.named_parameters(recurse=False):
            if leaf == "weight":
                yield name, Target(name)
            elif leaf != "bias":
                yield f"{name}.{leaf}", Target(name, leaf=leaf)
    for leaf, _ in model.named_parameters(recurse=False):
        yield leaf, Target("", leaf=leaf)


def _underscore_spellings(dotted: dict) -> dict:
    """``{kohya underscore spelling: target}`` of the dotted names; None where a spelling is ambiguous.

    Two different targets with one underscore spelling are refused rather than guessed.
    """
    underscored: dict[str, Optional[Target]] = {}
    for name, target in dotted.items():
        key = name.replace(".", "_")
        previous = underscored.get(key, target)
        underscored[key] = target if previous == target else None
    return underscored


class TargetTable:
    """Every accepted name (dotted, and its kohya underscore spelling) -> :class:`Target` for one model.

    Built from the model's real module names, so names that contain underscores
    themselves (``adaln_single``, ``linear_1``) resolve correctly from kohya keys.
    The first target found for a name wins: the tensors outside the blocks, then each
    block's aliases.
    """

    def __init__(self, model: nn.Module):
        blocks = getattr(model, "transformer_blocks", None)
        self.num_blocks = len(blocks) if blocks is not None else 0
        self.dotted: dict[str, Target] = {}
        found = itertools.chain(_outer_targets(model),
                                *(_block_aliases(index, block) for index, block in enumerate(blocks or ())))
        for name, target in found:
            self.dotted.setdefault(name, target)
        self.underscored = _underscore_spellings(self.dotted)

    def lookup(self, name: str, underscored: bool = False) -> tuple[Optional[Target], str]:
        """(target, "") for an accepted name, else (None, reason) -- reason says why, for the report."""
        table = self.underscored if underscored else self.dotted
        if name in table:
            target = table[name]
            if target is None:
                return None, "ambiguous underscore name (matches two different layers)"
            return target, ""
        block = _block_index(name, underscored)
        if block is not None and block >= self.num_blocks:
            return None, f"block {block} does not exist (the model has {self.num_blocks} blocks)"
        return None, "no such layer in the Step-Video DiT"


def _block_index(name: str, underscored: bool) -> Optional[int]:
    """The block number a (possibly underscored) name refers to, if it names a block."""
    sep = "_" if underscored else "."
    for prefix in BLOCK_PREFIXES:
        head = prefix + sep
        if name.startswith(head):
            digits = name[len(head):].split(sep, 1)[0]
            if digits.isdigit():
                return int(digits)
    return None


def resolve_module(model: nn.Module, target: Target) -> nn.Module:
    """The module a target names (the model itself for top-level parameters)."""
    return model.get_submodule(target.module) if target.module else model


def target_shape(model: nn.Module, target: Target) -> tuple:
    """Shape of the tensor region a patch for ``target`` must have (slot rows when sliced)."""
    tensor = getattr(resolve_module(model, target), target.leaf)
    shape = tuple(tensor.shape)
    if target.slot is not None:
        shape = (target.slot.rows(shape[0]),) + shape[1:]
    return shape
