"""The communication of a parallel run, on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Why our own Ulysses exchange instead of ``yunchang``/``xfuser``: yunchang installs and its
all-to-all runs on gloo here, but its Ulysses layer calls its own attention kernels (flash-attn
types), which would bypass the pack's attention dispatch (SDPA as the bit-exact reference,
SageAttention, ...) and its masked-call rules; xfuser pulls in a serving stack the pack does not
need.  The exchange itself is two ``all_to_all_single`` calls per self-attention, a few lines each.

A :class:`ParallelContext` is created on every rank, in the same order (``new_group`` is
collective), after ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .layout import ParallelLayout, token_offsets, token_split


class ParallelContext:
    """This rank's place in a :class:`ParallelLayout`, with its process groups.

    ``sp_group`` holds the ranks sharing one video's tokens (Ulysses), ``cfg_group`` the two ranks
    computing the two guidance branches of the same tokens.  ``device`` is where this rank computes.
    """

    def __init__(self, layout: ParallelLayout, rank: int, device: torch.device,
                 sp_group=None, cfg_group=None):
        self.layout = layout
        self.rank = rank
        self.device = torch.device(device)
        self.sp_group = sp_group
        self.cfg_group = cfg_group

    @classmethod
    def create(cls, layout: ParallelLayout, device: torch.device) -> "ParallelContext":
        """Build the groups of ``layout`` (every rank calls this, in the same order)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: start with torchrun (or init_process_group)")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != layout.world:
            raise RuntimeError(f"the layout is for {layout.world} processes, the process group has {world}")
        sp_group = cfg_group = None
        for ranks in layout.sp_groups():
            group = dist.new_group(ranks) if layout.sp > 1 else None
            if rank in ranks:
                sp_group = group
        for ranks in layout.cfg_groups():
            group = dist.new_group(ranks) if layout.cfg > 1 else None
            if rank in ranks:
                cfg_group = group
        return cls(layout, rank, device, sp_group, cfg_group)

    # ------------------------------------------------------------------ who holds what
    @property
    def sp_rank(self) -> int:
        return self.layout.sp_rank(self.rank)

    @property
    def cfg_rank(self) -> int:
        return self.layout.cfg_rank(self.rank)

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that writes files and reports."""
        return self.rank == 0

    def local_tokens(self, tokens: int) -> tuple[int, int]:
        """(start, count) of this rank's slice of ``tokens`` video tokens."""
        sizes = token_split(tokens, self.layout.sp)
        return token_offsets(sizes)[self.sp_rank], sizes[self.sp_rank]

    # ------------------------------------------------------------------ Ulysses
    def attention(self, qkv: list, attend, tokens: int) -> torch.Tensor:
        """Self-attention of this rank's tokens over the whole sequence.

        ``qkv``: the list ``[q, k, v]``, each [B, H, L_r, d] with this rank's L_r tokens and all H heads;
        it is emptied (each local tensor is dropped once it is in the send buffer).  One all-to-all turns
        them into all ``tokens`` for H/N heads, ``attend([q, k, v])`` (the pack's dispatch) runs, and a
        second all-to-all gives back [B, H, L_r, d].
        """
        sizes = token_split(tokens, self.layout.sp)
        out = attend(sequence_to_heads(qkv, sizes, self.sp_group))
        return heads_to_sequence(out, sizes, self.sp_group)

    def gather_tokens(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """[B, tokens, D] on every rank from each rank's [B, L_r, D] slice.

        One gather into a single buffer (a list of outputs would make the backend stage a flat copy
        of it too), then one concatenation in token order: two full-sequence copies at the peak
        beside the slice (``offload.planner``'s ``SP_GATHER_*``).
        """
        sizes = token_split(tokens, self.layout.sp)
        longest = max(sizes)
        if x.shape[1] == longest:
            send = x.contiguous()
        else:  # an uneven split: the shorter slices travel padded to the longest
            send = x.new_zeros((x.shape[0], longest) + tuple(x.shape[2:]))
            send[:, :x.shape[1]] = x
        gathered = x.new_empty((len(sizes) * send.shape[0],) + tuple(send.shape[1:]))  # ranks stacked on dim 0
        _gather_into(gathered, send, group=self.sp_group)
        parts = gathered.view((len(sizes),) + tuple(send.shape))
        del send
        return torch.cat([parts[r, :, :size] for r, size in enumerate(sizes)], dim=1)

    # ------------------------------------------------------------------ CFG
    def gather_branches(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) velocities on both ranks of a CFG pair, from each rank's own branch."""
        parts = [torch.empty_like(local) for _ in range(self.layout.cfg)]
        dist.all_gather(parts, local.contiguous(), group=self.cfg_group)
        return parts[0], parts[1]

    # ------------------------------------------------------------------ everyone
    def agree_to_stop(self, local_stop: bool) -> bool:
        """True on every rank when any rank was asked to stop (one tiny all-reduce), so all stop together."""
        flag = torch.tensor([1 if local_stop else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def broadcast_tensors(self, tensors, src: int = 0):
        """``tensors`` (CPU tensors in dicts, tuples, lists; given on ``src``) on every rank.

        Pickled between this run's own processes (``broadcast_object_list``), never read from a file.
        """
        holder = [tensors if self.rank == src else None]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]


# torch >= 2.10 names the one-buffer gather all_gather_single (all_gather_into_tensor is deprecated there)
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def sequence_to_heads(tensors: list, sizes: Sequence[int], group) -> list[torch.Tensor]:
    """Each [B, H, L_r, d] of the list ``tensors`` (this rank's tokens; emptied, each dropped once copied)
    -> [B, H/N, L, d] (every rank's tokens), in order.

    One all-to-all for all of them (q, k and v travel together).  Rank j receives head group j (heads
    j*H/N .. (j+1)*H/N - 1) of every rank's tokens, in rank order, which is token order
    (:func:`~.layout.token_split` gives consecutive slices).  Each input is copied into the send buffer
    and dropped, and the received pieces are assembled in the send buffer's own memory once the
    collective is done with it (a blocking call: on CUDA the compute stream waits for it), so the
    exchange needs two q|k|v-sized buffers whatever the collective's work object keeps alive: at a
    sequence-parallel block, 2 + 3 + 3 hidden-state copies of the rank's share, below the block's
    own peak (``offload.planner``).
    """
    n, count = len(sizes), len(tensors)
    batch, heads, local, dim = tensors[0].shape
    if heads % n:
        raise ValueError(f"{heads} heads cannot be split over {n} ranks")
    per = heads // n
    made = dict(dtype=tensors[0].dtype, device=tensors[0].device)  # no reference kept: the inputs go early
    unit = count * batch * per * dim                                                # elements per token
    tokens = sum(sizes)
    memory = torch.empty(max(n * local, tokens) * unit, **made)                     # send buffer, then result
    send = memory[:n * local * unit].view(n, count, batch, per, local, dim)         # by destination rank
    for i in range(count):
        send[:, i].copy_(tensors.pop(0).reshape(batch, n, per, local, dim).movedim(1, 0))
    recv = torch.empty(tokens * unit, **made)
    dist.all_to_all_single(recv, memory[:n * local * unit], output_split_sizes=[s * unit for s in sizes],
                           input_split_sizes=[local * unit] * n, group=group)
    del send
    out = memory[:tokens * unit].view(count, batch, per, tokens, dim)
    start = 0
    for piece, size in zip(recv.split([s * unit for s in sizes]), sizes):          # by source rank = token order
        out[:, :, :, start:start + size].copy_(piece.view(count, batch, per, size, dim))
        start += size
    del recv
    return list(out.unbind(0))


def heads_to_sequence(y: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads` for one tensor: [B, H/N, L, d] -> [B, H, L_r, d]."""
    n = len(sizes)
    rank = dist.get_rank(group) if group is not None else 0
    batch, per, _, dim = y.shape
    local = sizes[rank]
    unit = batch * per * dim                                                        # elements per token
    send = y.new_empty(sum(sizes) * unit)
    start = 0
    for piece, size in zip(send.split([s * unit for s in sizes]), sizes):           # rank j gets its tokens
        piece.view(batch, per, size, dim).copy_(y[:, :, start:start + size])
        start += size
    recv = y.new_empty(n * local * unit)
    dist.all_to_all_single(recv, send, output_split_sizes=[local * unit] * n,
                           input_split_sizes=[s * unit for s in sizes], group=group)
    del send
    out = recv.view(n, batch, per, local, dim).movedim(0, 1)                         # [B, N, H/N, L_r, d]
    return out.reshape(batch, n * per, local, dim)
