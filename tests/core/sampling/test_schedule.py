"""The schedule, Euler step and presets against the official scheduler (fixture made by its code)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stepvideo_core
from stepvideo_core.sampling import PRESETS, euler_step, flow_match_sigmas, guidance, resolve_settings

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "stepvideo_scheduler.safetensors"
CASES = {"t2v_50_shift13": (50, 13.0), "t2v_30_shift13": (30, 13.0), "turbo_15_shift17": (15, 17.0),
         "turbo_10_shift17": (10, 17.0), "argdefault_50_shift7": (50, 7.0)}


@pytest.fixture(scope="module")
def official():
    return load_file(str(FIXTURE))


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigmas_and_timesteps_are_bit_identical(official, case):
    steps, shift = CASES[case]
    sigmas = stepvideo_core.flow_match_sigmas(steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas, official[f"{case}.sigmas"])
    assert torch.equal(sigmas[:-1], official[f"{case}.timesteps"])


def test_schedule_runs_from_noise_to_data():
    sigmas = flow_match_sigmas(50, 13.0)
    assert sigmas[0] == 0.0 and sigmas[-1] == 1.0
    assert bool((sigmas[1:] > sigmas[:-1]).all())
    # a larger shift spends more steps near the noise end
    assert flow_match_sigmas(50, 17.0)[10] < flow_match_sigmas(50, 7.0)[10]


def test_euler_step_is_bit_identical(official):
    sigmas = official["t2v_50_shift13.sigmas"]
    out = euler_step(official["euler.sample"], official["euler.model_output"], sigmas, 0)
    assert out.dtype == torch.float32
    assert torch.equal(out, official["euler.prev_sample"])


def test_guidance_formula_and_dtype():
    c = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    u = torch.tensor([0.5, 4.0], dtype=torch.bfloat16)
    g = guidance(c, u, 9.0)
    assert g.dtype == torch.bfloat16
    assert torch.equal(g, u + 9.0 * (c - u))
    assert torch.equal(g.float(), torch.tensor([5.0, -14.0]))


def test_presets_and_overrides():
    assert resolve_settings("Step-Video-T2V") == {"steps": 50, "cfg": 9.0, "shift": 13.0}
    assert resolve_settings("Step-Video-T2V-Turbo") == {"steps": 15, "cfg": 5.0, "shift": 17.0}
    assert resolve_settings("Step-Video-T2V-Turbo", steps=10, cfg=1.0) == {"steps": 10, "cfg": 1.0, "shift": 17.0}
    assert set(PRESETS) == {"Step-Video-T2V", "Step-Video-T2V-Turbo"}
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_settings("SDXL")
    with pytest.raises(ValueError, match="steps"):
        resolve_settings(steps=0)
    with pytest.raises(ValueError, match="steps"):
        flow_match_sigmas(0, 13.0)
