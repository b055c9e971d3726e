"""The node-side reproductions of NaN settings and NaN adapters: each is a failed ComfyUI execution
(an exception), never a black-video result."""

from __future__ import annotations

import sys

import pytest
from safetensors.torch import save_file

from stepvideo_core.tiny import tiny_lora, write_tiny_lora
from tests.core.sampling.conftest import conditioning

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")
ARGS = dict(preset="Step-Video-T2V-Turbo", width=32, height=32, frames=17, steps=2, cfg=0.0, shift=0.0, seed=3)


def run_jobr(sampler_mod, model, **kw):
    return sampler_mod.StepVideoSampler().sample(model=model, positive=conditioning(1), negative=conditioning(2),
                                                 **dict(ARGS, **kw))


@pytest.mark.parametrize("widget", ["cfg", "shift"])
def test_sampler_node_refuses_a_nan_widget(sampler_mod, base, widget):
    """A JSON NaN passes ComfyUI's min/max check (every comparison with NaN is false)."""
    with pytest.raises(ValueError, match=f"{widget} must be a finite number, got nan"):
        run_jobr(sampler_mod, base, **{widget: NAN})


def test_sampler_node_raises_when_the_latents_go_non_finite(pack, sampler_mod, base, dit):
    error = sys.modules[f"{pack.__name__}.stepvideo_core.sampling"].NonFiniteError
    handle = dit.register_forward_hook(lambda _m, _a, out: out * NAN)
    try:
        with pytest.raises(error, match="at step 1/2"):
            run_jobr(sampler_mod, base)
    finally:
        handle.remove()


@pytest.fixture
def loras(models_dir):
    folder = models_dir / "loras"
    write_tiny_lora(folder / "good.safetensors", keys="comfy", alpha=4.0)
    state, _ = tiny_lora(keys="comfy", alpha=4.0)
    key = sorted(k for k in state if k.endswith(".lora_up.weight"))[0]
    state[key][0, 0] = NAN
    save_file(state, str(folder / "nan_values.safetensors"))
    return folder, key


def load_lora_node(lora_mod, model, name, strength=1.0):
    return lora_mod.StepVideoLoraLoader().load(model=model, lora_name=name, strength=strength, mode="auto", blocks="")


def test_lora_node_refuses_a_nan_strength(lora_mod, base, loras):
    with pytest.raises(ValueError, match="strength must be a finite number, got nan"):
        load_lora_node(lora_mod, base, "good.safetensors", strength=NAN)


def test_lora_node_refuses_a_file_with_a_nan_value(lora_mod, base, loras):
    _, key = loras
    with pytest.raises(ValueError, match=rf"nan_values.safetensors: tensor '{key}' holds 1 NaN/Inf value"):
        load_lora_node(lora_mod, base, "nan_values.safetensors")
    assert load_lora_node(lora_mod, base, "good.safetensors")["result"][0].adapters  # a good file still loads
