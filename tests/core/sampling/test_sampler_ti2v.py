"""Image-to-video sampling: the condition and the motion score reach every model call (both guidance
branches), the loop equals the official TI2V loop bit for bit, and image inputs that do not fit the
transformer are refused before the first step."""

import pytest
import torch
from torch import nn

from stepvideo_core.checks import NonFiniteError
from stepvideo_core.dit import StepVideoDiTConfig
from stepvideo_core.sampling import (DEFAULT_MOTION_SCORE, PRESETS, TI2V_PRESET, Placement, SamplingSettings,
                                     initial_noise, preset_for, resolve_motion_score, resolve_settings, sample)
from stepvideo_core.tiny import TINY_TI2V_DIT_CONFIG
from tests.core.sampling.conftest import conditioning, tiny_model

SIZE = dict(width=32, height=48, frames=17)  # latents [1, 3, 64, 3, 2]
LATENT = (1, 3, 64, 3, 2)


def image_latent(seed=0, shape=LATENT):
    """A condition as image_condition builds it: a random first latent frame, then zeros (fp32, CPU)."""
    condition = torch.zeros(shape)
    condition[:, :1] = torch.randn(shape[0], 1, *shape[2:], generator=torch.Generator().manual_seed(seed))
    return condition


class RecordingModel(nn.Module):
    """A stand-in DiT that records what each call receives and returns a simple velocity.

    Has what the sampler and the block streamer use: ``config`` (TI2V or not), ``compute_dtype``,
    one parameter (for the device) and an empty ``transformer_blocks``.
    """

    def __init__(self, ti2v=True, dtype=torch.bfloat16):
        super().__init__()
        self.config = StepVideoDiTConfig(num_layers=1, use_additional_conditions=ti2v)
        self.anchor = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)
        self.transformer_blocks = nn.ModuleList()
        self.calls = []

    @property
    def compute_dtype(self):
        return self.anchor.dtype

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_2=None,
                encoder_attention_mask=None, **image):
        self.calls.append(dict(batch=hidden_states.shape[0], dtype=hidden_states.dtype, timestep=timestep.clone(),
                               condition=None if "condition_hidden_states" not in image
                               else image["condition_hidden_states"].clone(),
                               motion_score=image.get("motion_score"), keys=sorted(image)))
        return -0.1 * hidden_states


@pytest.fixture(scope="module")
def ti2v32():
    return tiny_model(torch.float32, config=TINY_TI2V_DIT_CONFIG)


@pytest.fixture(scope="module")
def ti2v16():
    return tiny_model(torch.bfloat16, config=TINY_TI2V_DIT_CONFIG)


def test_both_cfg_branches_get_the_condition_and_the_score_at_every_step(pos, neg):
    model = RecordingModel()
    condition = image_latent(1)
    sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=9.0, shift=13.0, motion_score=7.5),
           condition=condition)
    assert len(model.calls) == 3  # batched CFG: one call per step
    want = condition.to(torch.bfloat16)
    for call in model.calls:
        assert call["batch"] == 2 and call["motion_score"] == 7.5
        cond, uncond = call["condition"].chunk(2)
        assert call["condition"].dtype == torch.bfloat16 == call["dtype"]  # cast like the latents
        assert torch.equal(cond, want) and torch.equal(uncond, want)      # the image in both branches


def test_sequential_and_unguided_calls_get_the_condition_too(pos, neg):
    condition = image_latent(2)
    model = RecordingModel()
    sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=13.0, motion_score=2.0),
           placement=Placement(batch_cfg=False), condition=condition)
    assert len(model.calls) == 4 and all(c["batch"] == 1 and c["motion_score"] == 2.0 for c in model.calls)
    assert all(torch.equal(c["condition"], condition.to(torch.bfloat16)) for c in model.calls)
    model = RecordingModel()
    sample(model, pos, None, settings=SamplingSettings(**SIZE, steps=2, cfg=1.0, shift=13.0), condition=condition)
    assert [c["batch"] for c in model.calls] == [1, 1]
    assert all(c["motion_score"] == DEFAULT_MOTION_SCORE == 5.0 for c in model.calls)  # the TI2V default


def test_t2v_calls_stay_as_they_were(pos, neg):
    model = RecordingModel(ti2v=False)
    sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=1, cfg=9.0, shift=13.0))
    assert model.calls[0]["keys"] == []  # no image keyword reaches a T2V model


def official_ti2v_loop(model, pos, neg, condition, motion_score, noise, steps, cfg, shift):
    """The official TI2V StepVideoPipeline.__call__ loop, line for line (prompts batched [cond, uncond],
    condition repeated twice for CFG and cast like the latents, motion_score a float every call)."""
    dtype = model.compute_dtype
    prompt_embeds = torch.cat([pos["encoder_hidden_states"], neg["encoder_hidden_states"]]).to(dtype)
    mask = torch.cat([pos["encoder_attention_mask"], neg["encoder_attention_mask"]]).to(dtype)
    clip = torch.cat([pos["encoder_hidden_states_2"], neg["encoder_hidden_states_2"]]).to(dtype)
    condition_hidden_states = condition.repeat(2, 1, 1, 1, 1).to(dtype)
    sigmas = 1 - (shift * torch.linspace(1, 0, steps + 1)) / (1 + (shift - 1) * torch.linspace(1, 0, steps + 1))
    latents = noise
    with torch.inference_mode():
        for i, t in enumerate(sigmas[:-1]):
            model_input = torch.cat([latents] * 2).to(dtype)
            timestep = t.expand(model_input.shape[0]).to(model_input.dtype)
            pred = model(hidden_states=model_input, timestep=timestep, encoder_hidden_states=prompt_embeds,
                         encoder_attention_mask=mask, encoder_hidden_states_2=clip,
                         condition_hidden_states=condition_hidden_states, motion_score=motion_score)
            text, uncond = pred.chunk(2)
            pred = uncond + cfg * (text - uncond)
            latents = latents.to(torch.float32) + pred.to(torch.float32) * (sigmas[i + 1] - sigmas[i])
    return latents


@pytest.mark.parametrize("fixture", ["ti2v32", "ti2v16"])
def test_matches_the_official_ti2v_loop_bit_for_bit(request, fixture, pos, neg):
    model = request.getfixturevalue(fixture)
    condition = image_latent(3)
    ours = sample(model, pos, neg,
                  settings=SamplingSettings(**SIZE, steps=3, cfg=9.0, shift=13.0, seed=7, motion_score=5.0),
                  condition=condition)
    ref = official_ti2v_loop(model, pos, neg, condition, 5.0, initial_noise(LATENT, seed=7), 3, 9.0, 13.0)
    assert ours.dtype == torch.float32 and ours.shape == LATENT
    assert torch.equal(ours, ref)


def test_the_image_and_the_motion_score_steer_the_result(ti2v32, pos, neg):
    run = dict(**SIZE, steps=2, cfg=9.0, shift=13.0, seed=4)
    base = sample(ti2v32, pos, neg, settings=SamplingSettings(**run, motion_score=5.0), condition=image_latent(4))
    assert not torch.equal(base, sample(ti2v32, pos, neg, settings=SamplingSettings(**run, motion_score=5.0),
                                        condition=image_latent(5)))
    assert not torch.equal(base, sample(ti2v32, pos, neg, settings=SamplingSettings(**run, motion_score=10.0),
                                        condition=image_latent(4)))
    sequential = sample(ti2v32, pos, neg, settings=SamplingSettings(**run, motion_score=5.0),
                        placement=Placement(batch_cfg=False), condition=image_latent(4))
    # float rounding only (batch 2 vs 1 matmuls), amplified by cfg 9: 1.7e-5 of values up to 12, as T2V's
    torch.testing.assert_close(sequential, base, rtol=1e-5, atol=5e-5)


def test_image_inputs_that_do_not_fit_the_transformer_are_refused(ti2v32, model32, pos, neg):
    run = dict(**SIZE, steps=1, cfg=9.0, shift=13.0)
    with pytest.raises(ValueError, match="an image condition was given, but the transformer is Step-Video-T2V"):
        sample(model32, pos, neg, settings=SamplingSettings(**run), condition=image_latent())
    with pytest.raises(ValueError, match="a motion_score was given, but the transformer is Step-Video-T2V"):
        sample(model32, pos, neg, settings=SamplingSettings(**run, motion_score=5.0))
    with pytest.raises(ValueError, match=r"Step-Video-TI2V \(image-to-video\): it needs the first-frame condition "
                                         r"\[1, 3, 64, 3, 2\]"):
        sample(ti2v32, pos, neg, settings=SamplingSettings(**run))
    with pytest.raises(ValueError, match=r"expected \[1 or 1, 3, 64, 3, 2\] for this size, got \[1, 6, 64, 3, 2\]"):
        sample(ti2v32, pos, neg, settings=SamplingSettings(**run), condition=image_latent(shape=(1, 6, 64, 3, 2)))
    with pytest.raises(ValueError, match="motion_score must be a finite number"):
        sample(ti2v32, pos, neg, settings=SamplingSettings(**run, motion_score=float("inf")), condition=image_latent())
    broken = image_latent()
    broken[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="the image condition holds 1 NaN/Inf value"):
        sample(ti2v32, pos, neg, settings=SamplingSettings(**run), condition=broken)


def test_a_batched_run_repeats_a_batch_one_condition():
    model = RecordingModel()
    pos2, neg2 = conditioning(1, batch=2), conditioning(2, batch=2)
    condition = image_latent(6)
    sample(model, pos2, neg2, settings=SamplingSettings(**SIZE, steps=1, cfg=9.0, shift=13.0), condition=condition)
    (call,) = model.calls
    assert call["batch"] == 4 and all(torch.equal(row, condition[0].to(torch.bfloat16)) for row in call["condition"])


def test_the_ti2v_preset():
    preset = PRESETS[TI2V_PRESET]
    assert TI2V_PRESET == "Step-Video-TI2V"
    assert (preset.frames, preset.steps, preset.cfg, preset.shift, preset.motion_score, preset.image) == \
        (102, 50, 9.0, 13.0, 5.0, True)
    assert resolve_settings(TI2V_PRESET) == {"steps": 50, "cfg": 9.0, "shift": 13.0}
    assert resolve_motion_score(TI2V_PRESET) == 5.0 and resolve_motion_score(TI2V_PRESET, 2) == 2.0
    assert resolve_motion_score("Step-Video-T2V") == DEFAULT_MOTION_SCORE
    with pytest.raises(ValueError, match="motion_score must be a finite number"):
        resolve_motion_score(TI2V_PRESET, float("nan"))
    assert preset_for(True) == TI2V_PRESET and preset_for(False) == "Step-Video-T2V"
    for name in ("Step-Video-T2V", "Step-Video-T2V-Turbo"):  # the text-to-video presets keep their behaviour
        assert (PRESETS[name].frames, PRESETS[name].motion_score, PRESETS[name].image) == (204, None, False)
