"""Which transformer block lives where, and when each is copied: the pure schedule of block streaming.

The first ``blocks_on_device`` blocks stay on the compute device for the whole
run ("resident").  The others ("streamed") live in host memory and take turns
in a small number of device *slots* (two: double buffering).  Before block b
computes in slot s, the next streamed block is already being copied into the
other slot, so copying overlaps computing.  The last streamed block of a pass
prefetches the first streamed block of the next pass (the next model call), so
after the first call no copy ever waits in front of a block.

When every streamed block fits in the slots (one or two streamed blocks) they
are copied once and stay, so streaming costs nothing after the first call.

This module is pure Python (no torch) so the schedule can be tested on its own;
:class:`~stepvideo_core.offload.streamer.BlockStreamer` executes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MAX_SLOTS = 2  # double buffering


@dataclass(frozen=True)
class Action:
    """One step of a pass, in the order the host issues them.

    ``kind`` "fetch": start copying ``block`` into ``slot`` (after that slot's previous
    occupant finished computing).  ``kind`` "compute": run ``block``, from ``slot``
    (after its copy finished) or, with ``slot`` None, from its resident weights.
    """

    kind: str
    block: int
    slot: Optional[int] = None


def split_blocks(num_blocks: int, blocks_on_device: Optional[int]) -> tuple[list[int], list[int]]:
    """(resident blocks, streamed blocks): the first ``blocks_on_device`` are resident; None means all."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must not be negative, got {num_blocks}")
    keep = num_blocks if blocks_on_device is None else int(blocks_on_device)
    if keep < 0:
        raise ValueError(f"blocks_on_device must not be negative, got {blocks_on_device}")
    keep = min(keep, num_blocks)
    return list(range(keep)), list(range(keep, num_blocks))


def slot_count(num_blocks: int, blocks_on_device: Optional[int]) -> int:
    """Device slots the streamer allocates: one per streamed block, at most :data:`MAX_SLOTS`."""
    return min(MAX_SLOTS, len(split_blocks(num_blocks, blocks_on_device)[1]))


def initial_state(num_blocks: int, blocks_on_device: Optional[int]) -> tuple:
    """Slot contents before the first pass: every slot empty (None)."""
    return (None,) * slot_count(num_blocks, blocks_on_device)


def plan_pass(num_blocks: int, blocks_on_device: Optional[int], state: tuple) -> tuple[list[Action], tuple]:
    """The actions of one model call and the slot contents after it.

    ``state`` is the tuple of blocks held by each slot (None = empty), as returned
    by :func:`initial_state` or by the previous call.  Guarantees (tested):

    * every block is computed once, in order 0..n-1;
    * a streamed block is computed from the slot its latest fetch targeted;
    * a fetch never targets the slot of the block computed next, and at most one
      fetch runs ahead of the computing block (two while resident blocks compute);
    * the pass ends with the first streamed block already fetched (wrap-around prefetch).
    """
    resident, streamed = split_blocks(num_blocks, blocks_on_device)
    slots = list(state)
    if len(slots) != slot_count(num_blocks, blocks_on_device):
        raise ValueError(f"state {state} does not have {slot_count(num_blocks, blocks_on_device)} slots")
    actions: list[Action] = []

    def fetch(block: int, busy: Optional[int]) -> None:
        if block in slots:
            return
        free = [s for s in range(len(slots)) if s != busy]
        empty = [s for s in free if slots[s] is None]
        target = (empty or free)[0]
        slots[target] = block
        actions.append(Action("fetch", block, target))

    if streamed:  # both slots start filling while the resident blocks compute
        fetch(streamed[0], None)  # a no-op after the first pass (wrap-around prefetch)
        if len(streamed) > 1:
            fetch(streamed[1], slots.index(streamed[0]))
    actions.extend(Action("compute", b) for b in resident)
    for k, block in enumerate(streamed):
        slot = slots.index(block)
        upcoming = streamed[(k + 1) % len(streamed)]
        if upcoming != block:
            fetch(upcoming, slot)
        actions.append(Action("compute", block, slot))
    return actions, tuple(slots)


def simulate(num_blocks: int, blocks_on_device: Optional[int], passes: int) -> list[list[Action]]:
    """The actions of ``passes`` consecutive model calls (for tests, benchmarks and docs)."""
    state = initial_state(num_blocks, blocks_on_device)
    out = []
    for _ in range(passes):
        actions, state = plan_pass(num_blocks, blocks_on_device, state)
        out.append(actions)
    return out


def copies_per_pass(num_blocks: int, blocks_on_device: Optional[int]) -> int:
    """Blocks copied host -> device per model call once warm (0 when every streamed block fits the slots)."""
    resident, streamed = split_blocks(num_blocks, blocks_on_device)
    return 0 if len(streamed) <= MAX_SLOTS else len(streamed)
