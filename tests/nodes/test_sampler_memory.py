"""StepVideoSampler on the CPU refuses a run that cannot fit in RAM before it allocates anything."""

from __future__ import annotations

import sys

import pytest

from stepvideo_core.offload.planner import GiB
from tests.core.sampling.conftest import conditioning
from tests.nodes.test_sampler_node import run


@pytest.fixture
def ram(pack, monkeypatch):
    """Set the RAM the core's sampling-run planner sees as available (bytes)."""
    planning = sys.modules[f"{pack.__name__}.stepvideo_core.sampling.run"]
    return lambda nbytes: monkeypatch.setattr(planning, "available_host_bytes", lambda: nbytes)


def test_impossible_cpu_run_is_refused_before_sampling(sampler_mod, base, ram, monkeypatch):
    ram(21 * GiB)
    monkeypatch.setattr(sampler_mod, "sample", lambda *a, **k: pytest.fail("nothing may be allocated"))
    with pytest.raises(ValueError) as err:
        run(sampler_mod, base, conditioning(1), conditioning(2), width=4096, height=4096, frames=1020)
    message = str(err.value)
    assert "refused before allocating" in message and "21.0 GiB available" in message
    assert "106.9 GiB beyond the weights" in message and "4096x4096 with at most 187 frames" in message


def test_a_run_that_fits_runs_and_says_so(sampler_mod, base, ram):
    ram(21 * GiB)
    latent, text = run(sampler_mod, base, conditioning(1), conditioning(2))
    assert latent["samples"].shape == (1, 64, 3, 3, 2)
    assert "all 2 blocks in RAM" in text and "21.0 GiB available" in text
