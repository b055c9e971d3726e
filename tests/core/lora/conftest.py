"""Shared pieces for the LoRA tests: the tiny DiT, its inputs, and the expected weights computed by hand."""

import pytest
import torch

from stepvideo_core.cli import smoke_inputs
from tests.core.sampling.conftest import tiny_model

HEAD_DIM = 128


def expected_state(state: dict, truth: list, strength: float = 1.0) -> dict:
    """``state`` (checkpoint names) with every LoRA layer of ``truth`` added by hand, in fp32.

    Independent of the loader's own mapping: a q/k/v part goes to the rows the reference
    documents -- the fused weight viewed as [heads, parts, 128, in], part ``index``.
    """
    out = {k: v.detach().float().clone() for k, v in state.items()}
    for layer in truth:
        weight = out[layer["module"] + ".weight"]
        delta = strength * layer["scale"] * (layer["up"] @ layer["down"])
        if layer["part"] is None:
            weight += delta
        else:
            index, parts = layer["part"]
            rows, cols = weight.shape
            heads = rows // (parts * HEAD_DIM)
            weight.view(heads, parts, HEAD_DIM, cols)[:, index] += delta.view(heads, HEAD_DIM, cols)
    return out


def run(model, inputs):
    with torch.inference_mode():
        return model(**inputs)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def snapshot(model) -> dict:
    """Exact copies of every parameter and buffer (fp8 bytes included)."""
    return {k: v.detach().clone() for k, v in list(model.named_parameters()) + list(model.named_buffers())}


def same(model, snap) -> bool:
    """True when every tensor of ``model`` is bit-identical to ``snap`` (compared as raw bytes)."""
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    return now.keys() == snap.keys() and all(
        now[k].dtype == snap[k].dtype and torch.equal(now[k].view(torch.uint8), snap[k].view(torch.uint8))
        for k in snap)



@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Every LoRA test module runs with one intra-op thread (see tests/conftest.py)."""
    yield

@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model(torch.float32)


@pytest.fixture(scope="module")
def inputs(model):
    return smoke_inputs(model, frames=2, height=2, width=3, text_tokens=6)
