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
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend, tokens: int) -> torch.Tensor:
        """Self-attention of this rank's tokens over the whole sequence.

        ``q``, ``k``, ``v`` [B, H, L_r, d] hold this rank's L_r tokens and all H heads; one all-to-all
        turns them into all ``tokens`` for H/N heads, ``attend(q, k, v)`` (the pack's dispatch) runs,
        and a second all-to-all gives back [B, H, L_r, d].
        """
        sizes = token_split(tokens, self.layout.sp)
        q, k, v = sequence_to_heads(torch.stack((q, k, v)), sizes, self.sp_group).unbind(0)
        out = attend(q, k, v)
        del q, k, v
        return heads_to_sequence(out, sizes, self.sp_group)

    def gather_tokens(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """[B, tokens, D] on every rank from each rank's [B, L_r, D] slice."""
        sizes = token_split(tokens, self.layout.sp)
        longest = max(sizes)
        padded = x.new_zeros((x.shape[0], longest) + tuple(x.shape[2:]))
        padded[:, :x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=self.sp_group)
        return torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=1)

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


def sequence_to_heads(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """[..., H, L_r, d] with this rank's tokens -> [..., H/N, L, d] with every rank's tokens (one all-to-all).

    Rank j receives head group j (heads j*H/N .. (j+1)*H/N - 1) of every rank's tokens, in rank order,
    which is token order (:func:`~.layout.token_split` gives consecutive slices).
    """
    n = len(sizes)
    *lead, heads, local, dim = x.shape
    if heads % n:
        raise ValueError(f"{heads} heads cannot be split over {n} ranks")
    per = heads // n
    send = x.reshape(*lead, n, per, local, dim).movedim(len(lead), 0).contiguous()   # [N, ..., H/N, L_r, d]
    unit = send[0].numel() // local                                                  # elements per token
    recv = torch.empty(sum(sizes) * unit, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(recv, send.reshape(-1), output_split_sizes=[s * unit for s in sizes],
                           input_split_sizes=[local * unit] * n, group=group)
    parts = [p.reshape(*lead, per, size, dim) for p, size in zip(recv.split([s * unit for s in sizes]), sizes)]
    return torch.cat(parts, dim=-2)


def heads_to_sequence(y: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`: [..., H/N, L, d] -> [..., H, L_r, d]."""
    n = len(sizes)
    rank = dist.get_rank(group) if group is not None else 0
    *lead, per, _, dim = y.shape
    local = sizes[rank]
    send = torch.cat([part.reshape(-1) for part in y.split(list(sizes), dim=-2)])
    unit = per * dim * int(torch.Size(lead).numel())
    recv = torch.empty(n * local * unit, dtype=y.dtype, device=y.device)
    dist.all_to_all_single(recv, send, output_split_sizes=[local * unit] * n,
                           input_split_sizes=[s * unit for s in sizes], group=group)
    out = recv.reshape(n, *lead, per, local, dim).movedim(0, len(lead))            # [..., N, H/N, L_r, d]
    return out.reshape(*lead, n * per, local, dim)
