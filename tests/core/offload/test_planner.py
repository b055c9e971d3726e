"""The automatic memory plan: parameter counts, known configurations, and the activation model
checked against the bytes the real model code allocates (counted with LiveBytes)."""

import json

import pytest
import torch

from stepvideo_core import fp8, load_transformer
from stepvideo_core.offload.planner import (GiB, PlanInputs, auto_plan, estimate_peak, latent_tokens,
                                            parameter_counts, plan, weight_bytes)
from stepvideo_core.tiny import TINY_DIT_CONFIG
from tests.core.offload.livebytes import forward_peak
from tests.core.sampling.conftest import tiny_model
from tests.factory import write_tiny_dit
from tests.capabilities import needs_cpu_fp8_matmul


def test_parameter_counts_of_the_release_and_of_the_tiny_model():
    counts = parameter_counts()
    assert counts["block_linear"] + counts["block_other"] == 604_041_728
    assert counts["non_block"] == 348_475_456
    assert 48 * 604_041_728 + counts["non_block"] == 29_342_478_400
    model = tiny_model()
    tiny = parameter_counts(TINY_DIT_CONFIG)
    assert tiny["layers"] * (tiny["block_linear"] + tiny["block_other"]) + tiny["non_block"] == model.num_parameters()


def test_weight_bytes_match_real_models(tmp_path):
    bf16 = weight_bytes("bf16")
    assert 48 * bf16["block"] + bf16["non_block"] == 2 * 29_342_478_400  # 58.7 GB
    assert 29.3e9 < 48 * weight_bytes("fp8_scaled")["block"] + weight_bytes("fp8_scaled")["non_block"] < 29.8e9
    src = write_tiny_dit(tmp_path / "sv")
    q = load_transformer(src, dtype=torch.bfloat16, weight_format="fp8_scaled")
    sizes = weight_bytes("fp8_scaled", "bf16", TINY_DIT_CONFIG)
    assert fp8.weight_bytes(q.transformer_blocks[0]) == sizes["block"]
    assert fp8.weight_bytes(q) == 2 * sizes["block"] + sizes["non_block"]


# Known configurations (544x992, cfg on, SDPA, the released 30B config): the plan the node will use.
#
# What it protects: the choice users see (blocks kept on the GPU, batched CFG or one branch at a time)
# for the official size on common cards.  Any change to the memory model -- PEAK_UNITS and the other
# activation constants, the weight sizes (parameter_counts / weight_bytes), the fp8 workspace, the
# reserve (1 GiB + 5 %) or the CFG fallback -- moves some row, so the change has to be deliberate.
# Where the numbers come from: they are the planner's own output, a snapshot, not GPU measurements
# (README: the planner's figures are checked on the CPU and by construction only); the rows are
# `python bench/bench_planner.py` (the README's table) plus fp8 at 20 GiB, the row where batched CFG
# no longer fits.  The activation constants themselves are measured, by counting live tensors of the
# real block code: test_activation_model_covers_what_the_model_allocates below.
# How to refresh: after a deliberate change of the model, re-run that measurement (and update
# PEAK_UNITS from it if the block code changed), then print the new rows with
#   python -c "from tests.core.offload.test_planner import planned_now; print(*planned_now(), sep='\n')"
# and update KNOWN and the README table (what bench/bench_planner.py prints) together.
KNOWN = [  # weight format, frames, GiB free -> blocks on device, batched CFG
    ("bf16", 204, 24, 2, True), ("bf16", 204, 48, 22, True), ("bf16", 204, 80, 48, True),
    ("bf16", 51, 24, 13, True), ("bf16", 51, 48, 33, True), ("bf16", 51, 80, 48, True),
    ("fp8_scaled", 204, 20, 11, False), ("fp8_scaled", 204, 24, 2, True), ("fp8_scaled", 204, 48, 42, True),
    ("fp8_scaled", 204, 80, 48, True), ("fp8_scaled", 51, 24, 26, True), ("fp8_scaled", 51, 48, 48, True),
    ("fp8_scaled", 51, 80, 48, True),
]


def planned_now() -> list:
    """The KNOWN rows as the planner computes them now (to refresh the table, see above)."""
    return [(fmt, frames, gib, p["blocks_on_device"], p["batch_cfg"]) for fmt, frames, gib, *_ in KNOWN
            for p in [auto_plan(PlanInputs(992, 544, frames, weight_format=fmt), free_bytes=gib * GiB)]]


@pytest.mark.parametrize("fmt, frames, gib, blocks, batched", KNOWN)
def test_known_configurations(fmt, frames, gib, blocks, batched):
    p = auto_plan(PlanInputs(992, 544, frames, weight_format=fmt), free_bytes=gib * GiB)
    assert (p["blocks_on_device"], p["batch_cfg"], p["fits"]) == (blocks, batched, True)
    assert p["peak_bytes"] + p["reserve_bytes"] <= gib * GiB
    if blocks < 48:  # one more block would not fit
        more = plan(PlanInputs(992, 544, frames, cfg_batch=p["cfg_batch"], weight_format=fmt,
                               blocks_on_device=blocks + 1), free_bytes=gib * GiB)
        assert not more["fits"] or blocks + 1 >= 46  # 46..48 cost the same (slots)


def test_plan_is_json_friendly_and_itemised():
    p = auto_plan(PlanInputs(992, 544, 204, weight_format="fp8_scaled", attention="sageattention"), free_bytes=20 * GiB)
    assert json.loads(json.dumps(p)) == p
    assert p["tokens"] == 36 * 34 * 62 == latent_tokens(992, 544, 204)
    assert sum(p["items"].values()) == p["peak_bytes"]
    assert p["copies_per_step"] == p["streamed_blocks"] == 48 - p["blocks_on_device"]
    assert "streamed" in p["message"] and "one after the other" in p["message"]


def test_too_small_and_monotone():
    tiny = auto_plan(PlanInputs(992, 544, 204), free_bytes=8 * GiB)
    assert not tiny["fits"] and tiny["blocks_on_device"] == 0 and "does not fit" in tiny["message"]
    counts = [plan(PlanInputs(992, 544, 102), free_bytes=g * GiB)["blocks_on_device"] for g in (24, 32, 48, 64, 80)]
    assert counts == sorted(counts)
    by_frames = [plan(PlanInputs(992, 544, f), free_bytes=48 * GiB)["blocks_on_device"] for f in (17, 51, 102, 204)]
    assert by_frames == sorted(by_frames, reverse=True)
    fixed = plan(PlanInputs(992, 544, 51, blocks_on_device=10), free_bytes=80 * GiB)
    assert fixed["blocks_on_device"] == 10 and fixed["items"]["stream_slots"] == 2 * weight_bytes("bf16")["block"]
    assert plan(PlanInputs(992, 544, 51, blocks_on_device=47), free_bytes=80 * GiB)["items"]["stream_slots"] == \
        weight_bytes("bf16")["block"]
    with pytest.raises(ValueError):
        plan(PlanInputs(992, 544, 51, weight_format="int4"), free_bytes=GiB)
    with pytest.raises(ValueError):
        plan(PlanInputs(992, 544, 51, attention="xformers"), free_bytes=GiB)


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_activation_model_covers_what_the_model_allocates(dtype, name):
    """Estimate >= measured live bytes of a real forward (batch 2), and within 15% of it.

    The measured check behind KNOWN: LiveBytes counts every tensor the tiny DiT's real forward allocates
    (weights and inputs excluded), so the estimate's activation constants (PEAK_UNITS, RoPE tables,
    context copies) are held to what the block code does now, not to a stored number; if the block code
    keeps more alive, the estimate no longer covers it and this fails before any GPU run runs out of memory.
    """
    measured = forward_peak(tiny_model(dtype), dtype)
    est = estimate_peak(PlanInputs(32 * 16, 16 * 16, 17, blocks_on_device=2, weight_format=name,
                                   config=TINY_DIT_CONFIG))
    assert measured <= est["items"]["activations"] <= 1.15 * measured


@pytest.mark.parametrize("mode", [pytest.param("matmul", marks=needs_cpu_fp8_matmul), "dequantize"])
def test_fp8_paths_stay_inside_the_estimate(tmp_path, monkeypatch, mode):
    """Both fp8 paths: the matmul (where this torch has it on the CPU) and the dequantise path every torch has.

    The dequantise path quantises no activations, so it must also fit the full-precision activation
    model plus the workspace (the dequantised weights) alone -- the sharper bound for that path.
    """
    # quantisation chunks as small relative to the tensors as they are at full size (64 MB vs GBs)
    monkeypatch.setattr(fp8, "_CHUNK_ELEMENTS", 4096)
    q = load_transformer(write_tiny_dit(tmp_path / "sv"), dtype=torch.bfloat16, weight_format="fp8_scaled")
    fp8.set_matmul_mode(q, mode)
    measured = forward_peak(q, torch.bfloat16)
    est = estimate_peak(PlanInputs(32 * 16, 16 * 16, 17, blocks_on_device=2, weight_format="fp8_scaled",
                                   config=TINY_DIT_CONFIG))
    assert measured <= est["items"]["activations"] + est["items"]["workspace"]
    if mode == "dequantize":
        full = estimate_peak(PlanInputs(32 * 16, 16 * 16, 17, blocks_on_device=2, weight_format="bf16",
                                        config=TINY_DIT_CONFIG))
        assert measured <= full["items"]["activations"] + est["items"]["workspace"]
