"""The collectives of stepvideo_core.parallel on gloo (2-4 local processes): the Ulysses exchange gives
each rank exactly its slice of single-process attention, with token counts that do not split evenly;
the branch gather, the stop agreement and the broadcast; and the layout rules."""

from __future__ import annotations

import pytest
import torch

from stepvideo_core.parallel import ParallelConfigError, ParallelLayout, token_split
from tests.core.parallel import rank_jobs
from tests.core.parallel.ranks import run_ranks


@pytest.mark.parametrize("world, tokens", [(2, 36), (2, 37), (3, 31)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ulysses_attention_is_each_ranks_slice_of_the_full_attention(world, tokens, dtype):
    """Every head's attention runs whole (all tokens) on one rank, so the result is the single-process
    SDPA bit for bit: the exchange only moves values."""
    shape = (2, 6, tokens, 16)
    results = run_ranks(rank_jobs.exchange_attention, world, shape, dtype, 7)
    assert [r["count"] for r in results] == token_split(tokens, world)
    for r in results:
        assert torch.equal(r["local"], r["reference_slice"])
        assert torch.equal(r["gathered"], r["reference"])


def test_branches_stop_and_broadcast_on_four_ranks():
    """2 x 2 (CFG x sequence parallel): each CFG pair gathers (cond, uncond) from its two ranks."""
    results = run_ranks(rank_jobs.branches, 4)
    assert [(r["cfg_rank"], r["sp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results:
        assert torch.equal(r["cond"], torch.full((2, 3), 1.0)) and torch.equal(r["uncond"], torch.full((2, 3), 2.0))
        assert r["stop"] is True  # the last rank asked; all agree
        assert torch.equal(r["shared"], torch.arange(3))


def test_layouts():
    assert ParallelLayout.choose("auto", 4, 48, guided=True) == ParallelLayout(4, 2, 2)
    assert ParallelLayout.choose("auto", 3, 48, guided=True) == ParallelLayout(3, 3, 1)
    assert ParallelLayout.choose("auto", 4, 48, guided=False) == ParallelLayout(4, 4, 1)
    assert ParallelLayout.choose("ulysses", 8, 48, guided=True) == ParallelLayout(8, 8, 1)
    assert ParallelLayout.choose("cfg", 2, 48, guided=True) == ParallelLayout(2, 1, 2)
    assert ParallelLayout(4, 2, 2).cfg_groups() == [[0, 2], [1, 3]]
    assert ParallelLayout(4, 2, 2).sp_groups() == [[0, 1], [2, 3]]
    with pytest.raises(ParallelConfigError, match=r"does not divide them; use a number of processes in \[1, 2, 3, 4, 6, 8"):
        ParallelLayout.choose("ulysses", 5, 48, guided=True)
    with pytest.raises(ParallelConfigError, match="even number"):
        ParallelLayout.choose("cfg", 3, 48, guided=True)
    with pytest.raises(ParallelConfigError, match="needs guidance"):
        ParallelLayout.choose("cfg", 2, 48, guided=False)
    assert token_split(37, 2) == [19, 18] and token_split(31, 3) == [11, 10, 10]
    with pytest.raises(ParallelConfigError, match="cannot split 1 video tokens over 2"):
        token_split(1, 2)
