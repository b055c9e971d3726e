"""Plans for one rank of a parallel run: its share of the tokens (Ulysses), one branch (CFG parallel).

What the ranks really allocate is held to these plans in ``tests/core/parallel/test_dit_parallel.py``;
here, the rules on the release's sizes.
"""

import dataclasses

import pytest
import torch

from stepvideo_core.dit import StepVideoDiTConfig
from stepvideo_core.offload.planner import (GiB, SP_GATHER_FULL_UNITS, PlanInputs, auto_plan, estimate_peak,
                                            host_plan, latent_tokens, plan)
from stepvideo_core.parallel import ParallelLayout
from stepvideo_core.sampling import SamplingSettings
from stepvideo_core.sampling.run import DiTSetup, plan_blocks

RELEASE = PlanInputs(992, 544, 204, weight_format="bf16", blocks_on_device=48)


def activations(**changes):
    return estimate_peak(dataclasses.replace(RELEASE, **changes))["items"]["activations"]


def test_one_rank_is_the_default_and_changes_nothing():
    assert RELEASE.sequence_parallel == 1
    assert estimate_peak(RELEASE) == estimate_peak(dataclasses.replace(RELEASE, sequence_parallel=1))


def test_a_rank_plans_its_largest_share_of_the_tokens():
    tokens = latent_tokens(992, 544, 204)                       # 75,888
    for ranks in (2, 3, 4, 6, 8):
        est = estimate_peak(dataclasses.replace(RELEASE, sequence_parallel=ranks))
        assert est["tokens"] == tokens and est["tokens_per_rank"] == -(-tokens // ranks)
    odd = estimate_peak(PlanInputs(48, 16, 17, blocks_on_device=48, sequence_parallel=2))  # 9 tokens: 5 + 4
    assert odd["tokens_per_rank"] == 5


def test_shares_shrink_the_activations_until_the_gather_dominates():
    one, two, four, eight = (activations(sequence_parallel=n) for n in (1, 2, 4, 8))
    assert two < 0.55 * one and four < two and eight < four
    # past a few ranks the gather of every token after the last block sets the peak
    full_unit = 2 * latent_tokens(992, 544, 204) * 6144 * 2
    assert eight >= SP_GATHER_FULL_UNITS * full_unit


def test_more_blocks_stay_on_each_gpu_of_a_sequence_parallel_run():
    one = auto_plan(dataclasses.replace(RELEASE, blocks_on_device="auto"), free_bytes=40 * GiB)
    two = auto_plan(dataclasses.replace(RELEASE, blocks_on_device="auto", sequence_parallel=2), free_bytes=40 * GiB)
    assert two["blocks_on_device"] > one["blocks_on_device"]
    assert two["sequence_parallel"] == 2 and "per rank: 2 ranks share the 75888 tokens" in two["message"]
    assert "per rank" not in one["message"]


def test_the_rank_count_is_checked():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="sequence_parallel"):
            PlanInputs(992, 544, 204, sequence_parallel=bad)


def test_host_plans_count_the_whole_sequence():
    """CPU ranks on one machine share its RAM: a host plan is the whole run's, whatever the split."""
    shared = dataclasses.replace(RELEASE, sequence_parallel=4)
    assert host_plan(shared, available_bytes=None)["peak_bytes"] == host_plan(RELEASE, available_bytes=None)["peak_bytes"]


def test_a_parallel_layout_becomes_the_ranks_plan():
    config, setup = StepVideoDiTConfig(), DiTSetup(torch.bfloat16, blocks_on_device="auto")
    guided = SamplingSettings(992, 544, 204, steps=50, cfg=9.0, shift=13.0)
    assert setup.plan_inputs(config, guided).sequence_parallel == 1
    ulysses = setup.plan_inputs(config, guided, ParallelLayout.choose("ulysses", 4, 48, guided=True))
    assert (ulysses.sequence_parallel, ulysses.cfg_batch) == (4, 2)
    cfg = setup.plan_inputs(config, guided, ParallelLayout.choose("cfg", 4, 48, guided=True))
    assert (cfg.sequence_parallel, cfg.cfg_batch) == (2, 1)     # two branches x two ranks each
    gpu = torch.device("cuda")
    alone = plan_blocks(config, setup, guided, device=gpu, free_bytes=40 * GiB)
    shared = plan_blocks(config, setup, guided, device=gpu, free_bytes=40 * GiB,
                         layout=ParallelLayout.choose("ulysses", 2, 48, guided=True))
    assert shared["blocks_on_device"] > alone["blocks_on_device"]
    assert plan(cfg, free_bytes=40 * GiB)["cfg_batch"] == 1
