"""The step cache inside the sampler: off is the uncached sampler bit for bit, a skipped step calls no DiT
(both CFG branches, batched or not) and makes the block streamer move no weight, start/end and the
first/last steps hold, interrupts and progress behave as without cache, TI2V keeps working."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stepvideo_core.offload import BlockStreamer, SamplingInterrupted, simulate
from stepvideo_core.sampling import Placement, SamplingSettings, sample
from stepvideo_core.sampling import sampler as sampler_module
from stepvideo_core.sampling.cache import (Calibration, StepCache, calibration_from_stats, model_identity,
                                           summary)
from stepvideo_core.tiny import TINY_DIT_CONFIG, TINY_TI2V_DIT_CONFIG
from tests.core.sampling.conftest import conditioning, tiny_model
from tests.core.sampling.test_sampler_ti2v import RecordingModel, image_latent

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = dict(width=32, height=48, frames=17)  # latents [1, 3, 64, 3, 2]
RUN = dict(SIZE, cfg=9.0, shift=13.0, seed=4)
FIVE = dict(TINY_DIT_CONFIG, num_layers=5)
EVERYTHING = dict(threshold=1e9, start=0.0, end=1.0, max_skips=100)  # skip wherever the window allows


def flat_calibration(model, steps, preset="Step-Video-T2V"):
    return Calibration(model=model_identity(model), preset=preset, steps=steps, ratios=(1.0,) * steps)


def calls_per_step(model, **kwargs):
    """(latents, DiT calls made in each step, the batch of each call, stats) of one sample() run."""
    counts, batches, stats = [0], [], {}
    per_step = []

    def count(module, args, kw):
        counts[0] += 1
        batches.append(kw["hidden_states"].shape[0])

    def on_step(i, n, latents):
        per_step.append(counts[0])
        counts[0] = 0

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        out = sample(model, on_step=on_step, stats=stats, **kwargs)
    finally:
        hook.remove()
    return out, per_step, batches, stats


def homes(model):
    return {name: t.data_ptr() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.fixture(scope="module")
def five():
    return tiny_model(torch.float32, config=FIVE)


@pytest.fixture(scope="module")
def five_cond():
    return conditioning(1, valid=5, config=FIVE), conditioning(2, valid=2, config=FIVE)


# ----------------------------------------------------------------------------- off is bit-identical


@pytest.mark.parametrize("fixture", ["model32", "model16"])
@pytest.mark.parametrize("guidance", ["batched", "sequential", "none"])
def test_off_and_threshold_zero_are_the_uncached_sampler_bit_for_bit(request, fixture, guidance, pos, neg):
    model = request.getfixturevalue(fixture)
    settings = SamplingSettings(**RUN, steps=6)
    if guidance == "none":
        settings = dataclasses.replace(settings, cfg=1.0)
    run = dict(settings=settings, placement=Placement(batch_cfg=guidance != "sequential"))
    negative = None if guidance == "none" else neg
    plain = sample(model, pos, negative, **run)
    for cache in (None, StepCache(), StepCache("adaptive", 0.0, start=0.0, end=1.0),
                  StepCache("calibrated", 0.0, start=0.0, end=1.0, calibration=flat_calibration(model, 6)),
                  StepCache(record_ratios=True)):
        stats = {}
        out = sample(model, pos, negative, **run, cache=cache, stats=stats)
        assert torch.equal(out, plain), cache
        assert stats["skipped_calls"] == 0 and stats["dit_calls"] == 6 * (2 if guidance == "sequential" else 1)


# ----------------------------------------------------------------------------- where it skips


@pytest.mark.parametrize("mode", ["adaptive", "calibrated"])
def test_a_skipped_step_calls_no_model_and_the_window_holds(model32, pos, neg, mode):
    steps = 10
    cal = flat_calibration(model32, steps) if mode == "calibrated" else None
    for start, end, want in [(0.0, 1.0, list(range(1 if mode == "calibrated" else 2, 9))),
                             (0.3, 0.7, [3, 4, 5, 6])]:
        cache = StepCache(mode, calibration=cal, **dict(EVERYTHING, start=start, end=end))
        out, per_step, batches, stats = calls_per_step(model32, settings=SamplingSettings(**RUN, steps=steps),
                                                       positive=pos, negative=neg, cache=cache)
        skipped = [i for i, n in enumerate(per_step) if n == 0]
        assert skipped == want, (start, end)
        assert per_step[0] == 1 and per_step[-1] == 1  # the first and the last step always call the DiT
        assert set(batches) == {2}  # the batched [cond; uncond] call, never one branch alone
        assert stats["skipped_steps"] == [i + 1 for i in want] and stats["dit_calls"] == steps - len(want)
        assert not torch.equal(out, sample(model32, pos, neg, settings=SamplingSettings(**RUN, steps=steps)))


@pytest.mark.parametrize("mode", ["adaptive", "calibrated"])
def test_cfg_one_branch_at_a_time_skips_both_branches_together(model32, pos, neg, mode):
    steps = 8
    cal = flat_calibration(model32, steps) if mode == "calibrated" else None
    cache = StepCache(mode, calibration=cal, **EVERYTHING)
    batched, per_batched, _, _ = calls_per_step(model32, settings=SamplingSettings(**RUN, steps=steps), positive=pos,
                                                negative=neg, cache=cache)
    out, per_step, batches, stats = calls_per_step(model32, settings=SamplingSettings(**RUN, steps=steps),
                                                   placement=Placement(batch_cfg=False), positive=pos, negative=neg,
                                                   cache=cache)
    assert set(per_step) == {0, 2} and set(batches) == {1}  # a step makes both calls or none
    assert [n // 2 for n in per_step] == per_batched  # the same steps skipped as with batched CFG
    assert stats["dit_calls"] == sum(per_step) and stats["skipped_calls"] == 2 * per_step.count(0)
    assert f"{sum(per_step)} of {2 * steps} DiT calls run" in summary(stats)
    assert torch.allclose(out, batched, atol=1e-4, rtol=1e-5)  # as uncached: float rounding only


def test_a_skipped_step_reuses_the_last_velocity(model32, pos, neg):
    """Steps 1..4 of 6 skipped after step 0: the latents move on along the step-0 velocity."""
    from stepvideo_core.sampling import flow_match_sigmas, initial_noise
    steps = 6
    cache = StepCache("calibrated", calibration=flat_calibration(model32, steps), **EVERYTHING)
    seen = []
    sample(model32, pos, neg, settings=SamplingSettings(**RUN, steps=steps), cache=cache,
           on_step=lambda i, n, x: seen.append(x.clone()))
    sigmas = flow_match_sigmas(steps, RUN["shift"])
    x0 = initial_noise((1, 3, 64, 3, 2), RUN["seed"])
    v0 = (seen[0] - x0) / (sigmas[1] - sigmas[0])
    for i in range(1, 5):
        assert torch.allclose(seen[i] - seen[i - 1], v0 * (sigmas[i + 1] - sigmas[i]), atol=1e-5)


# ----------------------------------------------------------------------------- streaming


def test_skipped_steps_move_no_streamed_weight(five, five_cond, monkeypatch):
    """Blocks 1-4 streamed through slots ("copy" transport): the streamer's trace grows by one model call's
    schedule on each computed step and not at all on a skipped one; the whole trace is exactly the schedule
    of the DiT calls that ran (simulate), i.e. the skipped steps' fetches are gone, not delayed."""
    streamers = []

    class Recording(BlockStreamer):
        def __enter__(self):
            streamers.append(self)
            return super().__enter__()

    monkeypatch.setattr(sampler_module, "BlockStreamer", Recording)
    steps = 8
    before = homes(five)
    trace_at = []
    stats = {}
    cache = StepCache("adaptive", 1e9, start=0.0, end=1.0, max_skips=2)
    sample(five, *five_cond, settings=SamplingSettings(**RUN, steps=steps),
           placement=Placement(blocks_on_device=1, streamer_mode="copy"), cache=cache, stats=stats,
           on_step=lambda i, n, x: trace_at.append(len(streamers[-1].trace)))
    (streamer,) = streamers
    grown = [b - a for a, b in zip([0] + trace_at, trace_at)]
    skipped = [i + 1 for i, g in enumerate(grown) if g == 0]
    assert skipped == stats["skipped_steps"] and len(skipped) >= 3
    calls = stats["dit_calls"]
    assert streamer.trace == [a for actions in simulate(5, 1, calls) for a in actions]
    fetches = sum(a.kind == "fetch" for a in streamer.trace)
    uncached = sum(a.kind == "fetch" for actions in simulate(5, 1, steps) for a in actions)
    assert fetches < uncached and uncached - fetches == 4 * len(skipped)  # 4 streamed blocks per skipped call
    assert homes(five) == before


def test_interrupt_in_a_cached_streamed_run_leaves_the_weights_home(five, five_cond):
    """Calibrated, at most one skip in a row: step 1 computes, step 2 is skipped, and the stop comes in the
    middle of step 3's DiT call (its 4th poll: the step check, blocks 0, 1, 2): every tensor is home again,
    no hook is left and the stats say what ran."""
    steps = 6
    cache = StepCache("calibrated", calibration=flat_calibration(five, steps), **dict(EVERYTHING, max_skips=1))
    before = homes(five)
    done, polls, stats = [], [], {}

    def stop():
        if len(done) == 2:
            polls.append(1)
        return len(polls) == 4

    with pytest.raises(SamplingInterrupted, match="before transformer block 2"):
        sample(five, *five_cond, settings=SamplingSettings(**RUN, steps=steps),
               placement=Placement(blocks_on_device=1, streamer_mode="copy"), cache=cache, stats=stats,
               should_stop=stop, on_step=lambda i, n, x: done.append(i))
    assert done == [1, 2] and stats["skipped_steps"] == [2] and stats["dit_calls"] == 1
    assert homes(five) == before
    assert not five._forward_pre_hooks and not any(b._forward_pre_hooks or b._forward_hooks
                                                   for b in five.transformer_blocks)
    with pytest.raises(SamplingInterrupted, match="before step 4"):  # and between steps, after a skipped one
        sample(five, *five_cond, settings=SamplingSettings(**RUN, steps=steps),
               placement=Placement(blocks_on_device=1, streamer_mode="copy"), cache=cache,
               should_stop=lambda: len(done) == 5, on_step=lambda i, n, x: done.append(i))
    assert done[2:] == [1, 2, 3] and homes(five) == before


# ----------------------------------------------------------------------------- progress, stats


def test_progress_is_reported_on_every_step(model32, pos, neg):
    steps = 7
    seen = []
    stats = {}
    cache = StepCache("adaptive", **EVERYTHING)
    out = sample(model32, pos, neg, settings=SamplingSettings(**RUN, steps=steps), cache=cache, stats=stats,
                 on_step=lambda i, n, x: seen.append((i, n, x.dtype, tuple(x.shape))))
    assert seen == [(i, steps, torch.float32, (1, 3, 64, 3, 2)) for i in range(1, steps + 1)]
    assert stats["skipped_steps"] and torch.isfinite(out).all()
    assert stats["cache"].startswith("adaptive (threshold 1e+09, steps 0%-100%")


def test_a_recording_run_measures_a_calibration_for_its_model(model32, pos, neg):
    stats = {}
    sample(model32, pos, neg, settings=SamplingSettings(**RUN, steps=5), cache=StepCache(record_ratios=True),
           stats=stats)
    assert stats["model"] == model_identity(model32) and len(stats["ratios"]) == 5 and stats["ratios"][0] == 1.0
    cal = calibration_from_stats(stats, preset="Step-Video-T2V", cfg=9, shift=13)
    stats = {}
    sample(model32, pos, neg, settings=SamplingSettings(**RUN, steps=5),
           cache=StepCache("calibrated", 0.5, start=0.0, calibration=cal), stats=stats)
    assert stats["mode"] == "calibrated" and stats["dit_calls"] + stats["skipped_calls"] == 5


def test_model_identity_follows_the_weights_not_their_dtype(tmp_path):
    """One identity for the same weights in fp32, bf16 and fp8_scaled; another for other weights or config."""
    from stepvideo_core import load_transformer
    from tests.factory import write_tiny_dit
    src = write_tiny_dit(tmp_path / "sv")
    ident = model_identity(load_transformer(src, dtype=torch.float32))
    assert model_identity(load_transformer(src, dtype=torch.bfloat16)) == ident
    assert model_identity(load_transformer(src, dtype=torch.float32, weight_format="fp8_scaled")) == ident
    assert model_identity(tiny_model(torch.float32, seed=1)) != model_identity(tiny_model(torch.float32, seed=0))
    assert model_identity(tiny_model(torch.float32, config=TINY_TI2V_DIT_CONFIG)).startswith("Step-Video-TI2V/")
    assert ident.startswith("Step-Video-T2V/")


# ----------------------------------------------------------------------------- TI2V


def test_ti2v_runs_with_the_cache():
    """The condition and the motion score reach every DiT call that runs; skipped steps call nothing."""
    model = RecordingModel(ti2v=True, dtype=torch.float32)
    condition = image_latent(3)
    run = dict(settings=SamplingSettings(**RUN, steps=8, motion_score=7.0), condition=condition)
    plain = sample(model, conditioning(1), conditioning(2), **run)
    model.calls.clear()
    stats = {}
    out = sample(model, conditioning(1), conditioning(2), **run, stats=stats,
                 cache=StepCache("adaptive", 1e9, start=0.0, end=1.0, max_skips=1))
    assert stats["skipped_steps"] and len(model.calls) == stats["dit_calls"]
    assert all(c["motion_score"] == 7.0 and c["batch"] == 2 and torch.equal(c["condition"][0], condition[0])
               and torch.equal(c["condition"][1], condition[0]) for c in model.calls)
    assert out.shape == plain.shape and torch.isfinite(out).all()


def test_ti2v_tiny_model_off_is_bit_identical_and_adaptive_skips():
    model = tiny_model(torch.float32, config=TINY_TI2V_DIT_CONFIG)
    pos, neg = conditioning(1, config=TINY_TI2V_DIT_CONFIG), conditioning(2, config=TINY_TI2V_DIT_CONFIG)
    run = dict(settings=SamplingSettings(**RUN, steps=6, motion_score=5.0), condition=image_latent(1))
    plain = sample(model, pos, neg, **run)
    assert torch.equal(sample(model, pos, neg, **run, cache=StepCache()), plain)
    stats = {}
    out = sample(model, pos, neg, **run, stats=stats, cache=StepCache("adaptive", **EVERYTHING))
    assert stats["skipped_steps"] == [3, 4, 5] and torch.isfinite(out).all()
