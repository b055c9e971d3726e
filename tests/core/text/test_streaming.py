"""Resident / streamed / CPU execution of the Step-LLM and the plan choosing between them."""

from __future__ import annotations

import pytest
import torch

from stepvideo_core import build_step_llm
from stepvideo_core.text.streaming import (GiB, activation_bytes, choose_plan, plan, run_step_llm, stream_bytes,
                                           tensor_bytes)
from tests.factory import TINY_LLM_CONFIG, tiny_step_llm_state_dict

IDS = torch.tensor([[1, 17, 250, 33, 90, 2, 2, 2], [1, 400, 12, 2, 2, 2, 2, 2]])


@pytest.fixture(scope="module")
def llm():
    model = build_step_llm(TINY_LLM_CONFIG, device="cpu", dtype=torch.float32)
    model.load_state_dict(tiny_step_llm_state_dict())
    return model


# ----------------------------------------------------------------------------- plan (pure)

@pytest.mark.parametrize("free, expected", [
    (None, "cpu"),             # no GPU
    (0, "cpu"),
    (80 * GiB, "resident"),    # 80 GB card: 39 GB of layers fit
    (40 * GiB, "resident"),    # 37.5 + 0.25 + 1 <= 40
    (24 * GiB, "stream"),      # 24 GB card: one 0.8 GB layer at a time
    (2 * GiB, "stream"),       # 0.8 + 0.25 + 1 <= 2
    (1.5 * GiB, "cpu"),        # not even one layer with headroom
])
def test_plan_on_released_figures(free, expected):
    # 48 layers x 399M parameters in bf16 (the embedding stays on the CPU), B=2, S=320 activations.
    layer = 2 * (8192 * 6144 + 6144 * 6144 + 33792 * 6144 + 6144 * 16896)
    assert plan(free, model_bytes=48 * layer, activation_bytes=GiB // 4, layer_bytes=layer) == expected


def test_plan_boundaries_and_headroom():
    assert plan(10, model_bytes=6, activation_bytes=2, layer_bytes=1, headroom=2) == "resident"
    assert plan(10, model_bytes=7, activation_bytes=2, layer_bytes=1, headroom=2) == "stream"
    assert plan(5, model_bytes=7, activation_bytes=2, layer_bytes=1, headroom=2) == "stream"
    assert plan(4, model_bytes=7, activation_bytes=2, layer_bytes=1, headroom=2) == "cpu"


def test_choose_plan_sizes_the_released_model_without_memory():
    released = build_step_llm(None, dtype=torch.bfloat16)  # meta: shapes only
    assert tensor_bytes(released.layers) == 2 * 48 * 399_519_744  # 19,579,600,896 minus the embedding, over 48 layers
    act = activation_bytes(released.config, 2, 320, torch.bfloat16)
    assert 50e6 < act < 1e9
    assert stream_bytes(released, 2, 320) < 2 * GiB
    assert choose_plan(released, "cuda", 2, 320, free_vram=24 * GiB) == "stream"
    assert choose_plan(released, "cuda", 2, 320, free_vram=80 * GiB) == "resident"
    assert choose_plan(released, "cuda", 2, 320, free_vram=1 * GiB) == "cpu"
    assert choose_plan(released, "cpu", 2, 320, free_vram=80 * GiB) == "cpu"


# ----------------------------------------------------------------------------- execution

def test_all_modes_equal_the_module_forward_bit_for_bit(llm):
    with torch.no_grad():
        expected = llm(IDS)
    for mode in ("stream", "resident", "cpu"):
        assert torch.equal(run_step_llm(llm, IDS, "cpu", mode), expected), mode


def test_streaming_leaves_the_resting_module_alone(llm):
    before = {k: (v.data_ptr(), v.device, v.dtype) for k, v in llm.state_dict().items()}
    run_step_llm(llm, IDS, "cpu", "stream")
    assert {k: (v.data_ptr(), v.device, v.dtype) for k, v in llm.state_dict().items()} == before
    assert llm.alibi is True


def test_alibi_override_does_not_touch_the_model(llm):
    plain = build_step_llm(TINY_LLM_CONFIG, device="cpu", dtype=torch.float32, alibi=False)
    plain.load_state_dict(llm.state_dict())
    with torch.no_grad():
        expected = plain(IDS)
    assert torch.equal(run_step_llm(llm, IDS, "cpu", "stream", alibi=False), expected)
    assert llm.alibi is True


def test_progress_callback_and_bad_mode(llm):
    seen = []
    run_step_llm(llm, IDS, "cpu", "stream", on_layer=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    with pytest.raises(ValueError, match="mode must be"):
        run_step_llm(llm, IDS, "cpu", "auto")
