"""The memory plan of a Step-Video-TI2V run: the doubled patch embed and the motion-score embedder in the
weights, the image condition in the per-step memory, and T2V plans left exactly as they were."""

import dataclasses

import pytest
import torch

from stepvideo_core import StepVideoDiTConfig, build_transformer, fp8, load_transformer
from stepvideo_core.offload.planner import (ACTIVATION_BYTES, GiB, PlanInputs, auto_plan, condition_bytes,
                                            estimate_peak, host_activation_bytes, host_plan, latent_tokens,
                                            parameter_counts, weight_bytes)
from stepvideo_core.sampling import SamplingSettings
from stepvideo_core.sampling.run import DiTSetup, plan_blocks
from stepvideo_core.tiny import TINY_DIT_CONFIG, TINY_TI2V_DIT_CONFIG
from tests.core.offload.livebytes import LiveBytes
from tests.core.sampling.conftest import tiny_model
from tests.factory import write_tiny_dit

RELEASE_TI2V = StepVideoDiTConfig(use_additional_conditions=True).to_dict()
D = 6144


def test_parameter_counts_of_the_released_and_the_tiny_ti2v_model():
    t2v, ti2v = parameter_counts(), parameter_counts(RELEASE_TI2V)
    extra = 64 * D + (256 * D + D + D * D + D)  # 64 more patch-embed input channels, the motion-score embedder
    assert ti2v["non_block"] == t2v["non_block"] + extra
    assert ti2v["block_linear"] == t2v["block_linear"] and ti2v["layers"] == 48
    assert 48 * (ti2v["block_linear"] + ti2v["block_other"]) + ti2v["non_block"] == \
        build_transformer(RELEASE_TI2V).num_parameters()
    tiny = parameter_counts(TINY_TI2V_DIT_CONFIG)
    assert tiny["layers"] * (tiny["block_linear"] + tiny["block_other"]) + tiny["non_block"] == \
        tiny_model(config=TINY_TI2V_DIT_CONFIG).num_parameters()
    assert weight_bytes("bf16", config=RELEASE_TI2V)["non_block"] == 2 * ti2v["non_block"]


def test_fp8_weight_bytes_of_a_ti2v_model(tmp_path):
    q = load_transformer(write_tiny_dit(tmp_path / "sv", config=TINY_TI2V_DIT_CONFIG), dtype=torch.bfloat16,
                         weight_format="fp8_scaled")
    sizes = weight_bytes("fp8_scaled", "bf16", TINY_TI2V_DIT_CONFIG)
    assert fp8.weight_bytes(q) == 2 * sizes["block"] + sizes["non_block"]


@pytest.mark.parametrize("dtype, cfg_batch", [("bf16", 2), ("bf16", 1), ("fp32", 2)])
def test_the_condition_is_an_item_of_ti2v_plans_only(dtype, cfg_batch):
    run = PlanInputs(992, 544, 102, cfg_batch=cfg_batch, blocks_on_device=20, weight_format=dtype,
                     compute_dtype=dtype)
    t2v = estimate_peak(run)
    ti2v = estimate_peak(dataclasses.replace(run, config=RELEASE_TI2V))
    L = latent_tokens(992, 544, 102)
    a = ACTIVATION_BYTES[dtype]
    held, concat = cfg_batch * L * 64 * a, cfg_batch * L * 128 * a  # [B,F,64,h,w] condition + [B,F,128,h,w] input
    assert "condition" not in t2v["items"]
    assert ti2v["items"]["condition"] == held + concat == condition_bytes(992, 544, 102, cfg_batch=cfg_batch,
                                                                          activation_bytes=a, config=RELEASE_TI2V)
    assert ti2v["total"] == sum(ti2v["items"].values())
    assert ti2v["total"] - t2v["total"] == held + concat + (ti2v["items"]["non_block_weights"]
                                                             - t2v["items"]["non_block_weights"])
    assert condition_bytes(992, 544, 102, cfg_batch=2, activation_bytes=2) == 0  # a T2V config


def test_host_plans_count_the_condition():
    t2v = PlanInputs(992, 544, 102, weight_format="fp32", attention="sdpa", compute_dtype="fp32")
    ti2v = dataclasses.replace(t2v, config=RELEASE_TI2V)
    gap = host_activation_bytes(ti2v) - host_activation_bytes(t2v)
    assert gap == condition_bytes(992, 544, 102, cfg_batch=2, activation_bytes=4, config=RELEASE_TI2V)
    plan = host_plan(ti2v, available_bytes=None)
    assert plan["peak_bytes"] == host_activation_bytes(ti2v)


def test_a_ti2v_plan_keeps_fewer_blocks_when_memory_is_tight():
    """The condition and the larger non-block weights cost room: at a budget where T2V just fits N blocks,
    TI2V fits at most N (and the plans are JSON-friendly with the extra item)."""
    for gib in (24, 32, 48):
        t2v = auto_plan(PlanInputs(992, 544, 102), free_bytes=gib * GiB)
        ti2v = auto_plan(PlanInputs(992, 544, 102, config=RELEASE_TI2V), free_bytes=gib * GiB)
        assert ti2v["blocks_on_device"] <= t2v["blocks_on_device"] and "condition" in ti2v["items"]
        assert ti2v["peak_bytes"] > t2v["peak_bytes"] or ti2v["blocks_on_device"] < t2v["blocks_on_device"]


def test_the_pipeline_plans_a_ti2v_model_with_its_condition():
    config = StepVideoDiTConfig(use_additional_conditions=True)
    run = SamplingSettings(992, 544, 102, steps=50, cfg=9.0, shift=13.0)
    plan = plan_blocks(config, DiTSetup(torch.bfloat16), run, device=torch.device("cuda"), free_bytes=40 * GiB)
    assert plan["items"]["condition"] == condition_bytes(992, 544, 102, cfg_batch=plan["cfg_batch"],
                                                         activation_bytes=2, config=config.to_dict())


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_the_estimate_covers_what_a_ti2v_forward_allocates(dtype, name):
    """LiveBytes of a real TI2V forward (batch 2, the condition as an input) stays within the activations
    plus the condition item (see test_planner.py::test_activation_model_covers_what_the_model_allocates)."""
    model = tiny_model(dtype, config=TINY_TI2V_DIT_CONFIG)
    gen = torch.Generator().manual_seed(0)
    frames, height, width = 3, 16, 32
    condition = torch.zeros(2, frames, 64, height, width)
    condition[:, :1] = torch.randn(2, 1, 64, height, width, generator=gen)
    kw = dict(hidden_states=torch.randn(2, frames, 64, height, width, generator=gen).to(dtype),
              timestep=torch.tensor([0.5, 0.5], dtype=dtype),
              encoder_hidden_states=torch.randn(2, 320, 96, generator=gen).to(dtype),
              encoder_hidden_states_2=torch.randn(2, 77, 48, generator=gen).to(dtype),
              encoder_attention_mask=torch.ones(2, 397, dtype=dtype), condition_hidden_states=condition.to(dtype))
    with torch.no_grad():
        counter = LiveBytes()
        counter.ignore(*model.parameters(), *model.buffers(), *kw.values())
        with counter:
            model(**kw, motion_score=5.0)
    est = estimate_peak(PlanInputs(width * 16, height * 16, 17, blocks_on_device=2, weight_format=name,
                                   config=TINY_TI2V_DIT_CONFIG))
    assert counter.peak <= est["items"]["activations"] + est["items"]["condition"]
    t2v = estimate_peak(PlanInputs(width * 16, height * 16, 17, blocks_on_device=2, weight_format=name,
                                   config=TINY_DIT_CONFIG))
    assert t2v["items"]["activations"] == est["items"]["activations"]
