"""``torchrun --nproc_per_node 2 -m stepvideo_core generate`` on two CPU ranks (gloo, the tiny default)
writes the one-process video: Ulysses sequence parallel is bit-identical on this model, so the mp4 is
the same file; CFG parallel runs too; rank 1 says nothing on stdout; a bad layout is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["generate", "--prompt", "a fox in the snow", "--steps", "2", "--seed", "5"]


def run(tmp_path, ranks, *extra, cache=None, name="out.mp4"):
    """One ``generate`` (``ranks`` > 1: under torchrun on a free port), the tiny default cached in ``cache``."""
    from tests.core.parallel.ranks import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO), STEPVIDEO_CACHE=str(cache or tmp_path / "cache"), OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                str(free_port()), "-m", "stepvideo_core"] if ranks > 1 else [sys.executable, "-m", "stepvideo_core"]
    out = tmp_path / name
    result = subprocess.run([*launcher, *ARGS, "--out", str(out), *extra], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    return result, out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tiny release for the module (written by the one-process run, before any ranks read it)."""
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("one")
    result, out = run(tmp, 1, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out.read_bytes()


def test_two_ranks_ulysses_write_the_one_process_video(tmp_path, single, cache):
    result, out = run(tmp_path, 2, "--parallel", "ulysses", cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes() == single
    assert result.stdout.count("Wrote ") == 1 and "Ulysses sequence parallel over 2 ranks" in result.stdout
    assert result.stdout.count("No --models given") == 1  # rank 1 is quiet


def test_two_ranks_cfg_parallel_run(tmp_path, single, cache):
    result, out = run(tmp_path, 2, "--parallel", "cfg", cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 0 and "CFG parallel (cond | uncond)" in result.stdout


def test_cfg_parallel_without_guidance_is_refused_before_loading(tmp_path, single, cache):
    result, _ = run(tmp_path, 2, "--parallel", "cfg", "--cfg", "1", cache=cache)
    assert result.returncode != 0
    assert "CFG parallel needs guidance" in result.stderr
