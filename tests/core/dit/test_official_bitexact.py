"""Bit-exactness against the official code run on *this* machine (opt-in).

The shipped fixture was made on another CPU (see test_parity.py); when an official
checkout and the oracle script are at hand, this test runs the official
StepVideoModel here and requires our bf16 and fp32 outputs to be bit-identical.
Set STEPVIDEO_ORACLE_SRC (official checkout) and STEPVIDEO_ORACLE (path to
stepvideo_oracle.py); needs `einops` installed.
"""

import importlib.util
import os

import pytest
import torch

from stepvideo_core import build_transformer

ORACLE = os.environ.get("STEPVIDEO_ORACLE")
needs_oracle = pytest.mark.skipif(
    not (ORACLE and os.environ.get("STEPVIDEO_ORACLE_SRC") and importlib.util.find_spec("einops")),
    reason="official checkout not configured (set STEPVIDEO_ORACLE and STEPVIDEO_ORACLE_SRC)")


@needs_oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_official_on_this_machine(dtype):
    spec = importlib.util.spec_from_file_location("stepvideo_oracle", ORACLE)
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    official, config = oracle.build_dit(seed=3)
    inputs = {k: v.to(dtype) for k, v in oracle.dit_inputs(config, seed=5).items()}
    state = {k: v.clone() for k, v in official.state_dict().items()}
    ours = build_transformer(config, device="cpu", dtype=dtype)
    ours.load_state_dict(state)
    expected = official.to(dtype)(**inputs, return_dict=False)
    with torch.no_grad():
        got = ours(**inputs)
    assert torch.equal(got, expected)
