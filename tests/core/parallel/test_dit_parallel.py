"""The DiT on several gloo ranks samples what one process samples: Ulysses sequence parallel (9 tokens:
an uneven 5 + 4 split), CFG parallel, both on 4 ranks, with block streaming on each rank and with a LoRA
on the fly; nothing is left attached afterwards.

fp32 bound: max relative difference 1e-5 of the latents after 2 steps (the split changes only how many
rows each matrix product sees; measured: see test output, typically ~1e-7).
"""

from __future__ import annotations

import pytest
import torch

from stepvideo_core.offload.planner import PlanInputs, estimate_peak
from stepvideo_core.tiny import TINY_DIT_CONFIG, write_tiny_lora
from tests.core.parallel import rank_jobs
from tests.core.parallel.ranks import run_ranks


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def check(results, layout):
    for r in results:
        assert r["layout"] == layout
        assert r["single"].shape == r["parallel"].shape
        assert rel(r["parallel"], r["single"]) <= 1e-5, rel(r["parallel"], r["single"])
        assert r["hooks_left"] == 0 and r["seams_left"] == 0
    assert all(torch.equal(r["parallel"], results[0]["parallel"]) for r in results)  # every rank has the video


@pytest.mark.parametrize("mode, world, layout", [("ulysses", 2, (2, 1)), ("cfg", 2, (1, 2)), ("auto", 4, (2, 2))])
def test_parallel_sampling_equals_one_process(mode, world, layout):
    check(run_ranks(rank_jobs.dit_parallel, world, mode, 2, None, None), layout)


def test_sequence_parallel_with_block_streaming_and_a_lora_on_the_fly(tmp_path):
    path, _ = write_tiny_lora(tmp_path / "lora.safetensors", style="diffusers", keys="kohya", alpha=2.0, seed=1)
    check(run_ranks(rank_jobs.dit_parallel, 2, "ulysses", 2, str(path), 1), (2, 1))


def test_bf16_sequence_parallel_stays_within_bf16_rounding():
    """bf16: same computation in another row grouping; stated bound 2e-2 relative (bf16 has 8 bits)."""
    results = run_ranks(rank_jobs.dit_parallel, 2, "ulysses", 2, None, None, "bfloat16")
    for r in results:
        assert rel(r["parallel"].float(), r["single"].float()) <= 2e-2


@pytest.mark.parametrize("mode, world", [("ulysses", 2), ("auto", 4)])
def test_sample_parallel_equals_one_process_and_polls_only_between_steps(mode, world):
    results = run_ranks(rank_jobs.sample_with_parallel, world, mode, None, 0, 1)
    for r in results:
        assert r["outcome"] == "done" and r["steps"] == [1, 2, 3, 4]
        assert rel(r["latents"], r["single"]) <= 1e-5
        assert r["asked"] == 4  # once per step (the streamer polls nothing: ranks would leave collectives apart)


def test_a_stop_on_any_rank_stops_every_rank_at_the_same_step_with_weights_home():
    """Rank 1 asks to stop before step 3 (streaming one block): both ranks stop there, nothing hangs."""
    results = run_ranks(rank_jobs.sample_with_parallel, 2, "ulysses", 1, 3, 1)
    for r in results:
        assert r["outcome"] == "stopped" and r["steps"] == [1, 2] and r["weights_home"]


# --------------------------------------------------------------------------- a rank's memory
SIZE_MEASURED = dict(frames=3, height=16, width=32)        # 3 x 16 x 32 = 1536 tokens, 4 heads of 128
CONFIG_MEASURED = dict(TINY_DIT_CONFIG, num_attention_heads=4)


def rank_peaks(mode, world, dtype_name):
    """The bytes each rank's share of one batched-CFG forward allocates (LiveBytes)."""
    return [r["peak"] for r in run_ranks(rank_jobs.forward_live_bytes, world, mode, 4, dtype_name,
                                         *SIZE_MEASURED.values())]


def planned_activations(dtype_name, sequence_parallel=1, cfg_batch=2):
    name = {"bfloat16": "bf16", "float32": "fp32"}[dtype_name]
    run = PlanInputs(SIZE_MEASURED["width"] * 16, SIZE_MEASURED["height"] * 16, 17, cfg_batch=cfg_batch,
                     blocks_on_device=2, weight_format=name, config=CONFIG_MEASURED,
                     sequence_parallel=sequence_parallel)
    return estimate_peak(run)["items"]["activations"]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode, world", [("ulysses", 2), ("ulysses", 4), ("cfg", 2)])
def test_a_rank_allocates_no_more_than_its_plan(mode, world, dtype_name):
    """The planner's per-rank activations (its share of the tokens; one branch on a CFG rank) cover what
    each rank's forward allocates, and by at most 30 % more (measured: 2-23 %; the most at 4 ranks, where
    the estimate's text-context copies weigh most at these tiny sizes)."""
    sequence_parallel, cfg_batch = (world, 2) if mode == "ulysses" else (1, 1)
    planned = planned_activations(dtype_name, sequence_parallel, cfg_batch)
    for peak in rank_peaks(mode, world, dtype_name):
        assert peak <= planned <= 1.3 * peak, (peak, planned)


def test_sequence_parallel_ranks_hold_a_share_of_the_activations():
    """Two Ulysses ranks each allocate at most 60 % of what one process does (bf16; measured: 52 %), four
    at most 40 % (measured: 29 %): the exchange drops each local q, k, v once copied and assembles its result
    in its send buffer, the full sequence leaves before the first block, and the final gather goes into one
    buffer."""
    one = rank_peaks("ulysses", 1, "bfloat16")[0]
    assert max(rank_peaks("ulysses", 2, "bfloat16")) <= 0.6 * one
    assert max(rank_peaks("ulysses", 4, "bfloat16")) <= 0.4 * one
