"""Sampling on the CPU: the plan checks the activations against the available RAM and refuses what cannot fit."""

import pytest

from stepvideo_core.offload.planner import HOST_REFUSE_FACTOR, GiB, PlanInputs, host_activation_bytes, host_plan
from stepvideo_core.tiny import TINY_DIT_CONFIG

TINY = dict(TINY_DIT_CONFIG)


def cpu_run(width, height, frames, **kw):
    """A CPU run as the pipeline plans it by default: fp32 weights and activations, SDPA."""
    return PlanInputs(width, height, frames, **{"weight_format": "fp32", "compute_dtype": "fp32", **kw})


def test_the_issue_case_is_refused_with_numbers_and_what_would_fit():
    plan = host_plan(cpu_run(4096, 4096, 1020, config=TINY), available_bytes=21 * GiB)
    assert (plan["fits"], plan["refuse"]) == (False, True)
    assert plan["peak_bytes"] == host_activation_bytes(cpu_run(4096, 4096, 1020, config=TINY, cfg_batch=1))
    assert "needs about 202.5 GiB beyond the weights" not in plan["message"]  # one CFG branch at a time is tried
    assert "21.0 GiB available" in plan["message"] and "what fits: 4096x4096 with at most" in plan["message"]
    frames, size = plan["would_fit"]["frames"], plan["would_fit"]["size"]
    assert frames % 17 == 0 and size[0] == size[1] and size[0] % 16 == 0
    # what it proposes fits, and one step more does not
    for w, h, f in ((4096, 4096, frames), (size[0], size[1], 1020)):
        assert host_plan(cpu_run(w, h, f, config=TINY), available_bytes=21 * GiB)["fits"]
    assert not host_plan(cpu_run(4096, 4096, frames + 17, config=TINY), available_bytes=21 * GiB)["fits"]
    assert not host_plan(cpu_run(size[0] + 16, size[1] + 16, 1020, config=TINY), available_bytes=21 * GiB)["fits"]


def test_batched_cfg_first_then_one_branch_at_a_time():
    both = host_activation_bytes(cpu_run(992, 544, 204))
    one = host_activation_bytes(cpu_run(992, 544, 204, cfg_batch=1))
    assert 1.9 < both / one < 2.0
    roomy = host_plan(cpu_run(992, 544, 204), available_bytes=both + GiB)
    assert roomy["fits"] and roomy["batch_cfg"] and roomy["peak_bytes"] == both
    tight = host_plan(cpu_run(992, 544, 204), available_bytes=(both + one) // 2)
    assert tight["fits"] and not tight["batch_cfg"] and "one after the other" in tight["message"]
    unguided = host_plan(cpu_run(992, 544, 204, cfg_batch=1), available_bytes=(both + one) // 2)
    assert unguided["peak_bytes"] == one and not unguided["batch_cfg"]


def test_near_the_limit_it_warns_instead_of_refusing():
    need = host_activation_bytes(cpu_run(992, 544, 204, cfg_batch=1))
    close = host_plan(cpu_run(992, 544, 204), available_bytes=int(need / (HOST_REFUSE_FACTOR - 0.05)))
    assert (close["fits"], close["refuse"]) == (False, False)
    far = host_plan(cpu_run(992, 544, 204), available_bytes=int(need / (HOST_REFUSE_FACTOR + 0.05)))
    assert (far["fits"], far["refuse"]) == (False, True)
    unknown = host_plan(cpu_run(4096, 4096, 1020, config=TINY), available_bytes=None)
    assert unknown["fits"] and not unknown["refuse"]


def test_nothing_fits_is_said_plainly():
    plan = host_plan(cpu_run(64, 64, 17, config=TINY), available_bytes=1)
    assert plan["refuse"] and "not even 16x16x17 fits" in plan["message"]


@pytest.mark.parametrize("fmt", ["fp8_scaled", "bf16"])
def test_the_estimate_follows_the_weight_format(fmt):
    fp32 = host_activation_bytes(cpu_run(992, 544, 51))
    other = host_activation_bytes(PlanInputs(992, 544, 51, weight_format=fmt, compute_dtype="bf16"))
    assert other < fp32  # bf16 activations are half the size; fp8 adds its dequantise workspace
