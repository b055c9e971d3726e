"""Parity of our DiT in its image-to-video form with the official Step-Video-TI2V ``StepVideoModel``.

Fixture: tests/fixtures/stepvideo_ti2v_dit_tiny.safetensors, made by the official TI2V code
(``use_additional_conditions=True``: a 128-channel patch embed over latents ++ condition and a
motion-score embedder), with ``condition_hidden_states`` and ``motion_score=5.0``.

Tolerances are the T2V parity test's (tests/core/dit/test_parity.py explains why):
* fp32: max|ours - official| / max|official| <= 1e-5 for the output and every saved activation
  (measured 3.4e-7 for the output, 0 for pos_embed and adaln_single);
* bf16: only the distance to the fp32 reference is compared, mean and max of |bf16 - fp32| within
  1.05x the official bf16 run's own (measured ratios 0.990 and 1.000), never the bf16 bits.
* The motion score's own bf16 rounding (too small for that bar to see) has a targeted test whose
  expectation is computed here in float64, tolerance one bf16 ulp of a feature (2^-8).
"""

import math

import pytest
import torch

from stepvideo_core import load_transformer
from tests.core.dit.test_parity import capture_activations
from tests.factory import write_dit_checkpoint
from tests.oracle import OracleFixture, rel_err


@pytest.fixture(scope="module")
def ti2v_fixture() -> OracleFixture:
    return OracleFixture("stepvideo_ti2v_dit_tiny.safetensors")


@pytest.fixture(scope="module")
def checkpoint(ti2v_fixture, tmp_path_factory):
    """The fixture's weights in the official ``stepvideo-ti2v/transformer`` layout (config.json says TI2V)."""
    return write_dit_checkpoint(ti2v_fixture.state_dict, ti2v_fixture.config,
                                tmp_path_factory.mktemp("ti2v") / "stepvideo-ti2v", layout="official")


def model_inputs(fx, dtype=torch.float32) -> dict:
    """The fixture's inputs as the official call takes them: tensors in ``dtype``, motion_score a Python float."""
    inputs = {k: v.to(dtype) for k, v in fx.inputs.items() if k != "motion_score"}
    inputs["motion_score"] = float(fx.inputs["motion_score"])
    return inputs


def test_the_fixture_is_the_official_ti2v_model(ti2v_fixture, checkpoint):
    assert ti2v_fixture.meta["config"]["use_additional_conditions"] is True
    assert ti2v_fixture.state_dict["pos_embed.proj.weight"].shape == (256, 128, 1, 1)
    model = load_transformer(checkpoint, dtype=torch.float32)
    assert model.is_ti2v and model.config.in_channels == 64
    assert set(model.state_dict()) == set(ti2v_fixture.state_dict)


def test_fp32_output_and_every_activation(ti2v_fixture, checkpoint):
    model = load_transformer(checkpoint, dtype=torch.float32)
    acts = capture_activations(model)
    with torch.no_grad():
        out = model(**model_inputs(ti2v_fixture))
    ref = ti2v_fixture.outputs["fp32"]
    assert out.shape == ref.shape == (2, 3, 64, 4, 6)
    assert rel_err(out, ref) <= 1e-5
    assert set(ti2v_fixture.activations) <= set(acts)
    for name, expected in ti2v_fixture.activations.items():
        assert acts[name].shape == expected.shape, name
        assert rel_err(acts[name], expected) <= 1e-5, name


def test_bf16_is_no_further_from_fp32_than_the_official_bf16(ti2v_fixture, checkpoint):
    """Mean and max of |ours_bf16 - fp32| are at most 1.05x the official bf16 run's own (any CPU)."""
    model = load_transformer(checkpoint, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(**model_inputs(ti2v_fixture, torch.bfloat16))  # inputs and condition in bf16, as the pipeline
    assert out.dtype == torch.bfloat16
    error = (out.float() - ti2v_fixture.outputs["fp32"]).abs()
    official_mean, official_max = ti2v_fixture.official_bf16_error()
    assert error.mean().item() <= official_mean * 1.05
    assert error.max().item() <= official_max * 1.05


def motion_features(model, fx, motion_score, dtype):
    """The sinusoid features the motion-score embedder receives for one forward with ``motion_score``."""
    seen = []
    linear_1 = model.adaln_single.emb.motion_score_embedder.linear_1
    handle = linear_1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    inputs = model_inputs(fx, dtype)
    inputs["motion_score"] = motion_score
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    (features,) = seen
    return features


def sinusoid64(values) -> torch.Tensor:
    """The 256-channel features (cosines first) of ``values``, in float64, computed here."""
    t = torch.tensor(values, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = t[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def test_motion_score_is_rounded_to_bf16_before_the_sinusoid_and_not_scaled(checkpoint, ti2v_fixture):
    """Reference §1: ``tensor([score]).repeat(B)`` in the compute dtype, then the fp32 sinusoid, no x1000.

    In bf16, 5.3 becomes 5.3125 before the sinusoid (the official code does the same): the features
    are those of 5.3125, one bf16 ulp of a feature (2^-8) apart at most, and differ from 5.3's by up to
    0.0125 (the argument moves by 0.0125 at frequency 1).  In fp32 the score stays 5.3.
    """
    assert torch.tensor([5.3], dtype=torch.bfloat16).item() == 5.3125
    model16 = load_transformer(checkpoint, dtype=torch.bfloat16)
    features = motion_features(model16, ti2v_fixture, 5.3, torch.bfloat16)
    assert features.dtype == torch.bfloat16 and features.shape == (2, 256)
    rounded, exact = sinusoid64([5.3125, 5.3125]), sinusoid64([5.3, 5.3])
    assert (features.double() - rounded).abs().max().item() <= 2 ** -8
    assert (features.double() - exact).abs().max().item() > 0.01
    assert (rounded - exact).abs().max().item() > 0.01
    model32 = load_transformer(checkpoint, dtype=torch.float32)
    features32 = motion_features(model32, ti2v_fixture, 5.3, torch.float32)
    assert (features32.double() - sinusoid64([5.3, 5.3])).abs().max().item() <= 1e-5
    assert (sinusoid64([5300.0]) - exact[:1]).abs().max().item() > 0.5  # x1000 would be far off


def test_motion_score_changes_the_modulation_and_is_taken_as_float_or_tensor(checkpoint, ti2v_fixture):
    model = load_transformer(checkpoint, dtype=torch.float32)
    outs = {}
    for score in (5.0, torch.tensor([5.0]), torch.tensor(5.0), 10.0, torch.tensor([5.0, 10.0])):
        inputs = model_inputs(ti2v_fixture)
        inputs["motion_score"] = score
        with torch.no_grad():
            outs[str(score)] = model(**inputs)
    assert torch.equal(outs["5.0"], outs[str(torch.tensor([5.0]))])
    assert torch.equal(outs["5.0"], outs[str(torch.tensor(5.0))])
    assert rel_err(outs["10.0"], outs["5.0"]) > 1e-3
    per_sample = outs[str(torch.tensor([5.0, 10.0]))]  # one score per sample
    assert torch.equal(per_sample[0], outs["5.0"][0]) and torch.equal(per_sample[1], outs["10.0"][1])


def test_condition_enters_on_the_channel_axis(checkpoint, ti2v_fixture):
    """The patch embed sees [latents ++ condition] (channels 0-63 the latents, 64-127 the condition)."""
    model = load_transformer(checkpoint, dtype=torch.float32)
    seen = []
    handle = model.pos_embed.proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    inputs = model_inputs(ti2v_fixture)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    (patch_input,) = seen
    b, f, c, h, w = inputs["hidden_states"].shape
    assert patch_input.shape == (b * f, 2 * c, h, w)
    assert torch.equal(patch_input[:, :c], inputs["hidden_states"].reshape(b * f, c, h, w))
    assert torch.equal(patch_input[:, c:], inputs["condition_hidden_states"].reshape(b * f, c, h, w))
