"""The loader's optional ``compile`` input: on the handle, honoured by the sampler per run (no ComfyUI)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from tests.core.sampling.conftest import conditioning
from tests.factory import write_tiny_dit

SIZE = dict(width=32, height=32, frames=17)


@pytest.fixture
def model_mod(pack, bridge):
    return sys.modules[f"{pack.__name__}.nodes.model"]


@pytest.fixture
def compile_mod(pack):
    return sys.modules[f"{pack.__name__}.stepvideo_core.compile"]


def test_compile_is_an_optional_combo_defaulting_to_off(model_mod):
    declared = model_mod.StepVideoModelLoader.INPUT_TYPES()
    assert "compile" not in declared["required"]            # saved API workflows without it still validate
    options, spec = declared["optional"]["compile"]
    assert options == ["off", "blocks"] and spec["default"] == "off" and "Triton" in spec["tooltip"]


def test_loader_puts_the_choice_on_the_handle(model_mod, models_dir):
    write_tiny_dit(models_dir / "diffusion_models" / "tiny", layout="official")
    loader = model_mod.StepVideoModelLoader()
    (plain,) = loader.load(model="tiny", weight_dtype="fp32", attention="sdpa")["result"]
    out = loader.load(model="tiny", weight_dtype="fp32", attention="sdpa", blocks_on_device="auto", compile="blocks")
    (handle,) = out["result"]
    assert plain.compile == "off" and handle.compile == "blocks"
    assert "compile: blocks" in out["ui"]["text"][0]
    assert dataclasses.replace(handle, adapters=("lora",)).compile == "blocks"   # what the LoRA loader returns
    assert isinstance(model_mod.StepVideoModelLoader.IS_CHANGED(model="tiny", weight_dtype="fp32", attention="sdpa",
                                                                compile="blocks"), str)
    with pytest.raises(ValueError, match="compile must be one of"):
        loader.load(model="tiny", weight_dtype="fp32", attention="sdpa", compile="model")


def test_sampler_compiles_per_run_when_the_handle_says_so(pack, sampler_mod, types_mod, compile_mod, dit,
                                                          monkeypatch):
    """The sampler hands the handle's choice to compiled_blocks (here with a counting backend instead of inductor:
    dynamo's graph, run as traced), the blocks run compiled, and the summary says so.  The call is made by the
    core's sampling run (stepvideo_core.sampling.run), which the node and the pipeline share."""
    run_mod = sys.modules[f"{pack.__name__}.stepvideo_core.sampling.run"]
    seen, graphs = [], []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = run_mod.compiled_blocks

    def spy(transformer, choice, device=None):
        seen.append(choice)
        settings = compile_mod.CompileSettings.parse(choice)
        if settings.enabled:
            settings = dataclasses.replace(settings, backend=counting)
        return real(transformer, settings, device=device)

    monkeypatch.setattr(run_mod, "compiled_blocks", spy)
    base = dict(transformer=dit, dtype=torch.float32, device=torch.device("cpu"), offload_device=torch.device("cpu"),
                attention="sdpa", source=Path("tiny"))
    args = dict(positive=conditioning(1), negative=conditioning(2), preset="Step-Video-T2V-Turbo", **SIZE, steps=3,
                cfg=0.0, shift=0.0, seed=3)
    node = sampler_mod.StepVideoSampler()
    eager = node.sample(model=types_mod.StepVideoModelHandle(**base), **args)
    compiled = node.sample(model=types_mod.StepVideoModelHandle(**base, compile="blocks"), **args)
    assert seen == ["off", "blocks"] and len(graphs) == 1
    assert "compiled blocks" not in eager["ui"]["text"][0]
    assert "compiled blocks: 1 graph compiled this run" in compiled["ui"]["text"][0]
    want, got = eager["result"][0]["samples"], compiled["result"][0]["samples"]
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert all("forward" not in vars(block) for block in dit.transformer_blocks)   # nothing left on the model
