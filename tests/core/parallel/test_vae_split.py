"""The VAE decode split across gloo ranks is the single-process decode, bit for bit (fp32)."""

from __future__ import annotations

import pytest
import torch

from stepvideo_core.parallel.vae import chunk_runs
from stepvideo_core.tiny import write_tiny_vae
from tests.core.parallel import rank_jobs
from tests.core.parallel.ranks import run_ranks


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae"), layout="single", seed=3)


@pytest.mark.parametrize("world, frames", [(2, 9), (2, 6), (3, 6)])
def test_split_decode_is_the_single_process_decode(vae_file, world, frames):
    """9 latent frames = 3 chunks over 2 ranks (2 + 1: a seam between ranks and one inside rank 0's run);
    2 chunks over 3 ranks (one rank decodes nothing)."""
    results = run_ranks(rank_jobs.vae_decode, world, str(vae_file), frames)
    for r in results:
        assert torch.equal(r["split"], r["single"])
    assert sum(len(r["chunks"]) for r in results) == frames // 3


def test_chunk_runs():
    assert chunk_runs(3, 2) == [(0, 2), (2, 1)]
    assert chunk_runs(2, 3) == [(0, 1), (1, 1), (2, 0)]
    assert chunk_runs(12, 4) == [(0, 3), (3, 3), (6, 3), (9, 3)]
