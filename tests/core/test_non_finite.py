"""NaN/Inf never ends in a "successful" black video: settings, adapter files, fp8 scales and the sampler refuse it.

Every reproduction here ran to the end before (a black mp4, exit 0); each must now fail, naming
the input, key or step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import load_transformer
from stepvideo_core.checkpoint import CheckpointError
from stepvideo_core.checks import count_non_finite, finite_float
from stepvideo_core.lora import LoraEntry, LoraError, attached, load_lora
from stepvideo_core.sampling import NonFiniteError, SamplingSettings, resolve_settings, sample
from stepvideo_core.tiny import tiny_dit_state_dict, tiny_lora, write_tiny_lora
from tests.core.sampling.conftest import conditioning, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = dict(width=32, height=32, frames=17)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def dit(one_thread):
    return tiny_model(torch.float32)


# -- the rule -------------------------------------------------------------------------------

def test_finite_float_names_the_input_and_its_value():
    assert finite_float("0.5", "cfg") == 0.5 and finite_float(3, "shift") == 3.0
    with pytest.raises(ValueError, match="^cfg must be a finite number, got nan$"):
        finite_float(NAN, "cfg")
    with pytest.raises(ValueError, match="^shift must be a finite number, got -inf$"):
        finite_float(-INF, "shift")
    with pytest.raises(ValueError, match="^strength must be a number, got 'abc'$"):
        finite_float("abc", "strength")
    with pytest.raises(ValueError, match="^must be a finite number, got 'nan'$"):  # argparse adds the flag
        finite_float("nan")


def fp8_from_bits(bits, dtype):
    """An fp8 tensor holding exactly these bit patterns (no float conversion, which differs between torch
    releases: inf -> float8_e4m3fn is NaN in torch 2.9.1 and finite in 2.13)."""
    return torch.tensor(bits, dtype=torch.uint8).view(dtype)


def test_count_non_finite_covers_every_float_dtype():
    values = torch.tensor([1.0, NAN, INF, -2.0])
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert count_non_finite(values.to(dtype)) == 2, dtype
    cases = (  # dtype, bit patterns, the finite values among them, how many are NaN/Inf
        # e4m3fn has no inf; NaN is S.1111.111.  1, NaN, -2, -NaN, 448 (largest), 0, -0, 2^-9 (smallest subnormal)
        (torch.float8_e4m3fn, [0x38, 0x7F, 0xC0, 0xFF, 0x7E, 0x00, 0x80, 0x01],
         [1.0, -2.0, 448.0, 0.0, -0.0, 2.0 ** -9], 2),
        # e5m2: 1, inf, -inf, NaN, -NaN, 57344 (largest), -2, 2^-16 (smallest subnormal)
        (torch.float8_e5m2, [0x3C, 0x7C, 0xFC, 0x7E, 0xFF, 0x7B, 0xC0, 0x01],
         [1.0, 57344.0, -2.0, 2.0 ** -16], 4),
    )
    for dtype, bits, finite, count in cases:
        decoded = fp8_from_bits(bits, dtype).float()  # the fixture is what its comment says
        assert decoded[torch.isfinite(decoded)].tolist() == finite, dtype
        assert count_non_finite(fp8_from_bits(bits, dtype)) == count, dtype
        finite_bits = [b for b, ok in zip(bits, torch.isfinite(decoded).tolist()) if ok]
        assert count_non_finite(fp8_from_bits(finite_bits, dtype)) == 0, dtype
    assert count_non_finite(torch.ones(3, dtype=torch.int64)) == 0


# -- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["cfg", "shift"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_resolve_settings_refuses_non_finite_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got {value}"):
        resolve_settings("Step-Video-T2V", **{field: value})


def test_sample_refuses_a_nan_cfg_instead_of_silently_dropping_guidance(dit):
    with pytest.raises(ValueError, match="cfg must be a finite number, got nan"):
        sample(dit, conditioning(1), conditioning(2), settings=SamplingSettings(**SIZE, steps=1, cfg=NAN, shift=13.0))
    with pytest.raises(ValueError, match="shift must be a finite number, got nan"):
        sample(dit, conditioning(1), None, settings=SamplingSettings(**SIZE, steps=1, cfg=1.0, shift=NAN))


def test_lora_entry_refuses_a_nan_strength(dit, tmp_path):
    path, _ = write_tiny_lora(tmp_path / "style.safetensors", keys="comfy")
    adapter = load_lora(path, dit)
    with pytest.raises(ValueError, match="LoRA strength must be a finite number, got nan"):
        LoraEntry(adapter, NAN)
    assert LoraEntry(adapter, 1).strength == 1.0 and isinstance(LoraEntry(adapter, 1).strength, float)


# -- adapter files ---------------------------------------------------------------------------

def nan_lora(path, config=None, bad=1):
    """A valid tiny LoRA file with ``bad`` NaNs planted in its first lora_up tensor; returns (path, that key)."""
    state, _ = tiny_lora(config=config, keys="comfy", alpha=4.0)
    key = sorted(k for k in state if k.endswith(".lora_up.weight"))[0]
    state[key].view(-1)[:bad] = NAN
    save_file(state, str(path))
    return path, key


def test_an_adapter_with_one_nan_is_refused_at_load_naming_the_key(dit, tmp_path):
    path, key = nan_lora(tmp_path / "nan_values.safetensors", bad=3)
    with pytest.raises(LoraError, match=rf"nan_values.safetensors: tensor '{key}' holds 3 NaN/Inf values"):
        load_lora(path, dit)


def test_an_adapter_with_inf_alpha_is_refused(dit, tmp_path):
    state, _ = tiny_lora(keys="comfy", alpha=4.0)
    key = sorted(k for k in state if k.endswith(".alpha"))[-1]
    state[key] = torch.tensor(INF)
    save_file(state, str(tmp_path / "inf_alpha.safetensors"))
    with pytest.raises(LoraError, match=rf"tensor '{key}' holds 1 NaN/Inf value"):
        load_lora(tmp_path / "inf_alpha.safetensors", dit)


def test_a_peft_config_with_a_nan_alpha_is_refused(dit, tmp_path):
    folder, _ = write_tiny_lora(tmp_path / "peft", keys="peft", alpha=8.0)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = NAN  # json writes NaN and reads it back
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraError, match="lora_alpha must be a finite number, got nan"):
        load_lora(folder, dit)


# -- fp8 scales ------------------------------------------------------------------------------

FP8_LAYER = "transformer_blocks.0.ff.net.2"


def fp8_file(tmp_path, scale_values):
    """A ComfyUI-style scaled-fp8 tiny DiT whose FP8_LAYER has ``scale_values`` as its scale_weight."""
    state = tiny_dit_state_dict(seed=0)
    weight = state[f"{FP8_LAYER}.weight"]
    scale = torch.as_tensor(scale_values, dtype=torch.float32)
    good = weight.abs().max() / 448
    state[f"{FP8_LAYER}.weight"] = (weight / good).to(torch.float8_e4m3fn)
    state[f"{FP8_LAYER}.scale_weight"] = scale
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "fp8.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("scale, found", [(NAN, "1 of 1 values are NaN/Inf"), (0.0, "1 of 1 values are zero or "
                                                                                    "negative"),
                                          (-0.01, "1 of 1 values are zero or negative")])
def test_fp8_file_with_a_bad_scale_is_refused_naming_the_key(tmp_path, scale, found):
    path = fp8_file(tmp_path, scale)
    with pytest.raises(CheckpointError, match=rf"{FP8_LAYER}.scale_weight.*{found}"):
        load_transformer(path)


def test_fp8_per_channel_scales_with_one_nan_are_refused(tmp_path):
    rows = tiny_dit_state_dict(seed=0)[f"{FP8_LAYER}.weight"].shape[0]
    scales = torch.full((rows, 1), 0.01)
    scales[5, 0] = NAN
    with pytest.raises(CheckpointError, match=rf"fp8.safetensors: {FP8_LAYER}.scale_weight.*1 of {rows} values"):
        load_transformer(fp8_file(tmp_path, scales))


def test_fp8_file_with_good_scales_still_loads(tmp_path):
    model = load_transformer(fp8_file(tmp_path, 0.01))
    assert model.get_submodule(FP8_LAYER).is_fp8


# -- the sampler -----------------------------------------------------------------------------

def nan_from_call(model, call):
    """Make ``model``'s forward return NaN from its ``call``-th call on; returns the hook handle."""
    calls = []

    def hook(_module, _args, output):
        calls.append(1)
        return output * NAN if len(calls) >= call else output
    return model.register_forward_hook(hook)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_sampler_stops_at_the_step_that_went_non_finite(dit, cfg):
    seen = []
    handle = nan_from_call(dit, 2)  # one model call per step (CFG batched)
    try:
        with pytest.raises(NonFiniteError) as err:
            sample(dit, conditioning(1), conditioning(2),
                   settings=SamplingSettings(**SIZE, steps=3, cfg=cfg, shift=13.0),
                   on_step=lambda i, n, latents: seen.append(i))
    finally:
        handle.remove()
    message = str(err.value)
    assert "at step 2/3" in message and seen == [1]  # the NaN latents never reach a preview
    for cause in ("fp16", "bf16", "LoRA", "fp8", "text encoder"):
        assert cause in message, cause


def test_the_causes_this_run_has_are_marked(tmp_path):
    half = tiny_model(torch.float16)
    path, _ = write_tiny_lora(tmp_path / "style.safetensors", keys="comfy")
    handle = nan_from_call(half, 1)
    try:
        with attached(half, [load_lora(path, half)], mode="on_the_fly"), pytest.raises(NonFiniteError) as err:
            sample(half, conditioning(1), None, settings=SamplingSettings(**SIZE, steps=2, cfg=1.0, shift=13.0))
    finally:
        handle.remove()
    message = str(err.value)
    assert "at step 1/2" in message and "fp16 overflow [this run]" in message
    assert "LoRA/adapter [this run]" in message and "bad scales [this run]" not in message


def test_sampler_checks_the_conditioning_once_before_the_first_step(dit):
    bad = conditioning(2)
    bad["encoder_hidden_states_2"][0, 3, 1] = INF
    calls = []
    handle = dit.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(NonFiniteError, match="negative conditioning encoder_hidden_states_2 holds 1 NaN/Inf"):
            sample(dit, conditioning(1), bad, settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=13.0))
        sample(dit, conditioning(1), bad,
               settings=SamplingSettings(**SIZE, steps=1, cfg=1.0, shift=13.0))  # unguided: negative unused
    finally:
        handle.remove()
    assert calls == [1]


def test_a_finite_run_is_not_disturbed(dit):
    out = sample(dit, conditioning(1), conditioning(2), settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=13.0))
    assert math.isfinite(float(out.abs().max()))
