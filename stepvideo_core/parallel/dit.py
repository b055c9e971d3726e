"""The DiT on several ranks: :func:`attach` makes one model run its share of a parallel layout.

Nothing in the DiT's code changes (the blocks stay one model): forward hooks do the rest.

* **Sequence parallel (Ulysses).**  Before the first block each rank keeps its consecutive slice of
  the video tokens (:func:`~.layout.token_split`; uneven counts need no padding) and the matching rows
  of the RoPE tables (positions follow each rank's slice); every self-attention exchanges heads for
  tokens with one all-to-all before and one after (``SelfAttention.attend``, a block's only seam);
  cross-attention needs no exchange (each token attends to the whole text); after the last block
  the slices are gathered, so the output layer sees every token.  The slicing and the gathering
  wrap the model's ``run_blocks`` (it takes its input in a list, so the full sequence is released
  before the first block instead of living through it).
* **CFG parallel.**  The sampler's batched call ``[cond; uncond]`` is cut in two at the model's
  input: each rank of a CFG pair computes one half and the two halves are gathered again at the
  output, so the sampler sees the batched velocity as if one process had computed it.

Both compose (CFG pairs of sequence-parallel groups).  Every rank must run the same calls.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

from .context import ParallelContext

# the model's inputs that carry one row per batch sample (the rest -- e.g. motion_score -- are shared)
_BATCHED = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask",
            "condition_hidden_states")


class _Run:
    """Per-forward state shared by the hooks: how many tokens the full sequence has."""

    tokens = 0


@contextmanager
def attach(model: torch.nn.Module, ctx: ParallelContext):
    """Within the block, ``model`` (a StepVideoTransformer) computes this rank's share of ``ctx.layout``.

    Removes every hook and seam on exit (also after an exception).  A layout of one process
    changes nothing.
    """
    handles, seams = [], []
    blocks = list(model.transformer_blocks)
    run = _Run()
    if ctx.layout.sp > 1 and blocks:
        model.run_blocks = types.MethodType(_local_blocks(ctx, run), model)
        seams.append((model, "run_blocks"))
        for block in blocks:
            block.attn1.attend = types.MethodType(_sequence_parallel_attend(ctx, run), block.attn1)
            seams.append((block.attn1, "attend"))
    if ctx.layout.cfg > 1:
        handles.append(model.register_forward_pre_hook(_one_branch(ctx), with_kwargs=True))
        handles.append(model.register_forward_hook(_both_branches(ctx)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for owner, name in seams:
            delattr(owner, name)  # back to the class's own method


def _slice_rope(rope: tuple, start: int, count: int) -> tuple:
    cos, signed_sin, *rest = rope
    return (cos[start:start + count], signed_sin[start:start + count], *rest)


def _local_blocks(ctx: ParallelContext, run: _Run):
    """The model's ``run_blocks`` on this rank's tokens: slice before the first block, gather after the last."""
    def run_blocks(self, holder, context, t6, rope, mask):
        x = holder.pop()
        run.tokens = x.shape[1]
        start, count = ctx.local_tokens(run.tokens)
        holder.append(x[:, start:start + count].contiguous())
        del x  # the full sequence goes now, not after the first block
        out = type(self).run_blocks(self, holder, context, t6, _slice_rope(rope, start, count), mask)
        return ctx.gather_tokens(out, run.tokens)
    return run_blocks


def _sequence_parallel_attend(ctx: ParallelContext, run: _Run):
    def attend(self, qkv, backend):
        cls_attend = type(self).attend
        return ctx.attention(qkv, attend=lambda exchanged: cls_attend(self, exchanged, backend), tokens=run.tokens)
    return attend


def _one_branch(ctx: ParallelContext):
    def hook(model, args, kwargs):
        if args:
            raise TypeError("CFG parallel needs the model called with keyword arguments (as the sampler does)")
        batch = kwargs["hidden_states"].shape[0]
        if batch % 2:
            raise ValueError(f"CFG parallel splits the batched [cond; uncond] call in two, got a batch of {batch}: "
                             f"run the sampler with batched CFG")
        half = batch // 2
        rows = slice(ctx.cfg_rank * half, (ctx.cfg_rank + 1) * half)
        out = dict(kwargs)
        for name in _BATCHED:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                out[name] = value[rows]
        return args, out
    return hook


def _both_branches(ctx: ParallelContext):
    def hook(model, args, output):
        cond, uncond = ctx.gather_branches(output)
        return torch.cat([cond, uncond])
    return hook
