"""The denoising loop on a tiny DiT: faithful to the official pipeline's loop, callbacks, interrupts."""

import pytest
import torch

from stepvideo_core.offload import SamplingInterrupted
from stepvideo_core.sampling import Placement, SamplingSettings, flow_match_sigmas, initial_noise, sample

SIZE = dict(width=32, height=48, frames=17)  # latents [1, 3, 64, 3, 2]


def official_loop(model, pos, neg, noise, steps, cfg, shift):
    """The official StepVideoPipeline.__call__ loop, line for line (prompts batched [cond, uncond])."""
    dtype = model.compute_dtype
    prompt_embeds = torch.cat([pos["encoder_hidden_states"], neg["encoder_hidden_states"]]).to(dtype)
    mask = torch.cat([pos["encoder_attention_mask"], neg["encoder_attention_mask"]]).to(dtype)
    clip = torch.cat([pos["encoder_hidden_states_2"], neg["encoder_hidden_states_2"]]).to(dtype)
    sigmas = 1 - (shift * torch.linspace(1, 0, steps + 1)) / (1 + (shift - 1) * torch.linspace(1, 0, steps + 1))
    latents = noise
    with torch.inference_mode():
        for i, t in enumerate(sigmas[:-1]):
            model_input = torch.cat([latents] * 2).to(dtype)
            timestep = t.expand(model_input.shape[0]).to(model_input.dtype)
            pred = model(hidden_states=model_input, timestep=timestep, encoder_hidden_states=prompt_embeds,
                         encoder_attention_mask=mask, encoder_hidden_states_2=clip)
            text, uncond = pred.chunk(2)
            pred = uncond + cfg * (text - uncond)
            latents = latents.to(torch.float32) + pred.to(torch.float32) * (sigmas[i + 1] - sigmas[i])
    return latents


@pytest.mark.parametrize("fixture", ["model32", "model16"])
def test_matches_the_official_loop_bit_for_bit(request, fixture, pos, neg):
    model = request.getfixturevalue(fixture)
    noise = initial_noise((1, 3, 64, 3, 2), seed=7)
    ours = sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=9.0, shift=13.0, seed=7))
    ref = official_loop(model, pos, neg, noise, 3, 9.0, 13.0)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 64, 3, 2)
    assert torch.equal(ours, ref)


def test_model_receives_compute_dtype_inputs(model16, pos, neg):
    seen = []
    hook = model16.register_forward_pre_hook(lambda m, a, kw: seen.append({k: v for k, v in kw.items()}),
                                             with_kwargs=True)
    try:
        sample(model16, pos, neg, settings=SamplingSettings(**SIZE, steps=1, cfg=9.0, shift=13.0))
    finally:
        hook.remove()
    (call,) = seen
    for key in ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2",
                "encoder_attention_mask"):
        assert call[key].dtype == torch.bfloat16, key  # the mask too: the model sums it in this dtype
    assert call["hidden_states"].shape[0] == 2 and call["timestep"].shape == (2,)


def test_sequential_cfg_and_no_cfg(model32, pos, neg):
    batched = sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=17.0, seed=3))
    sequential = sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=17.0, seed=3),
                        placement=Placement(batch_cfg=False))
    assert torch.allclose(batched, sequential, atol=1e-5, rtol=1e-5)
    calls = []
    hook = model32.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]),
                                             with_kwargs=True)
    try:
        unguided = sample(model32, pos, None, settings=SamplingSettings(**SIZE, steps=2, cfg=1.0, shift=17.0, seed=3))
    finally:
        hook.remove()
    assert calls == [1, 1] and not torch.equal(unguided, batched)
    with pytest.raises(ValueError, match="negative"):
        sample(model32, pos, None, settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=17.0))


def test_callbacks_seed_and_explicit_noise(model32, pos, neg):
    steps_seen = []
    out = sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=9.0, shift=13.0, seed=11),
                 on_step=lambda i, n, x: steps_seen.append((i, n, x.dtype, tuple(x.shape))))
    assert steps_seen == [(i, 3, torch.float32, (1, 3, 64, 3, 2)) for i in (1, 2, 3)]
    again = sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=9.0, shift=13.0, seed=11))
    other = sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=9.0, shift=13.0, seed=12))
    given = sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=9.0, shift=13.0),
                   noise=initial_noise((1, 3, 64, 3, 2), seed=11))
    assert torch.equal(out, again) and torch.equal(out, given) and not torch.equal(out, other)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=1, cfg=9.0, shift=13.0),
               noise=torch.zeros(1, 3, 64, 2, 2))


def test_euler_steps_span_the_whole_schedule():
    """sigma runs 0 -> 1, so the Euler steps add up to velocity * 1 (noise -> data)."""
    sigmas = flow_match_sigmas(4, 13.0)
    assert torch.isclose((sigmas[1:] - sigmas[:-1]).sum(), torch.tensor(1.0))


def test_interrupt_between_blocks_and_between_steps(model32, pos, neg):
    polls = []

    def stop_on_third_poll():
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(SamplingInterrupted, match="block"):
        sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=2, cfg=9.0, shift=13.0),
               should_stop=stop_on_third_poll)
    assert len(polls) == 3  # step check, block 0, block 1 -> stopped before block 1 ran
    with pytest.raises(SamplingInterrupted, match="before step 1"):
        sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=2, cfg=9.0, shift=13.0),
               should_stop=lambda: True)
    # the model is untouched afterwards: hooks gone, same result as before
    assert not model32._forward_pre_hooks and not any(b._forward_pre_hooks for b in model32.transformer_blocks)
    sample(model32, pos, neg, settings=SamplingSettings(**SIZE, steps=1, cfg=9.0, shift=13.0))


def test_invalid_size_and_conditioning(model32, pos, neg):
    with pytest.raises(ValueError, match="nearest valid: 17 or 34"):
        sample(model32, pos, neg,
               settings=SamplingSettings(width=32, height=48, frames=20, steps=1, cfg=9.0, shift=13.0))
    with pytest.raises(ValueError, match="STEPVIDEO_CONDITIONING"):
        sample(model32, {"prompt": "x"}, neg, settings=SamplingSettings(**SIZE, steps=1, cfg=9.0, shift=13.0))
