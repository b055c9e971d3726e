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


def official_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The official ``set_timesteps`` arithmetic, transcribed operation for operation (fp32 linspace, shift)."""
    s = torch.linspace(1, 0, steps + 1)
    return 1 - (shift * s) / (1 + (shift - 1) * s)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigmas_and_timesteps_match_the_official_scheduler(official, case):
    """Bit-identical to the official arithmetic run here; within 2^-22 of the fixture made on another CPU.

    torch.linspace itself rounds differently on its scalar and vectorised CPU paths (e.g.
    ATEN_CPU_CAPABILITY=default vs avx2: one ulp of 0.28), and the official code calls it too, so
    only a comparison on the same CPU path can be bit-wise.
    """
    steps, shift = CASES[case]
    sigmas = stepvideo_core.flow_match_sigmas(steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas, official_sigmas(steps, shift))
    torch.testing.assert_close(sigmas, official[f"{case}.sigmas"], rtol=0, atol=2 ** -22)
    torch.testing.assert_close(sigmas[:-1], official[f"{case}.timesteps"], rtol=0, atol=2 ** -22)


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
    assert set(PRESETS) == {"Step-Video-T2V", "Step-Video-T2V-Turbo", "Step-Video-TI2V"}
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_settings("SDXL")
    with pytest.raises(ValueError, match="steps"):
        resolve_settings(steps=0)
    with pytest.raises(ValueError, match="steps"):
        flow_match_sigmas(0, 13.0)
