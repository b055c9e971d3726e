"""The step-cache rules on synthetic velocity sequences (no model): each skips exactly where its rule says.

The loop below is the sampler's (ask ``reuse``; else "call the model" = take the next synthetic
velocity and report it with ``computed``; Euler step), so the rule is exercised as the sampler
uses it.  Velocities are constant-valued tensors, so every ``mean|.|`` the rule takes is a plain
number and an independent scalar statement of the rule (the ``*_oracle`` functions) can say
where it must skip.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from stepvideo_core.sampling.cache import (CACHE_MODES, Calibration, CalibrationNotFound, CacheRun, StepCache,
                                           calibration_from_stats, find_calibration, load_calibrations,
                                           magnitude_ratio, save_calibration, summary)

SHAPE = (1, 1, 2, 1, 1)  # [B, F, C, h, w]: two channels so the token norm is not the value itself


def drive(cache, values, dts=None, x0=1.0, calls_per_step=1):
    """Run the sampler's loop on velocities ``values`` (scalars); returns (0-based skipped steps, stats)."""
    n = len(values)
    dts = dts or [1.0 / n] * n
    run = CacheRun(cache, n, calls_per_step)
    x = torch.full(SHAPE, float(x0))
    skipped = []
    for i in range(n):
        v = run.reuse(i, x)
        if v is None:
            v = torch.full(SHAPE, float(values[i]))
            run.computed(i, x, v, calls_per_step)
        else:
            skipped.append(i)
        x = x + v * dts[i]
    return skipped, run.stats


def adaptive_oracle(values, dts, x0, threshold, window, bound=None):
    """The adaptive rule on scalars, as the module docstring states it."""
    x, x_prev = x0, None
    real = []            # (x, v) of the real calls
    rate = out = None
    acc, in_a_row, used, skipped = 0.0, 0, None, []
    for i, value in enumerate(values):
        skip = False
        if i in window and real and rate is not None and (bound is None or in_a_row < bound):
            estimate = acc + rate * abs(x - x_prev) / out
            if estimate < threshold:
                acc, skip = estimate, True
        if skip:
            skipped.append(i)
            in_a_row += 1
        else:
            used = value
            if real:
                rate = abs(value - real[-1][1]) / max(abs(x - real[-1][0]), 1e-12)
            out = max(abs(value), 1e-12)
            real.append((x, value))
            acc, in_a_row = 0.0, 0
        x_prev = x
        x = x + used * dts[i]
    return skipped


def calibrated_oracle(ratios, threshold, window, bound):
    skipped, ratio, error, in_a_row = [], 1.0, 0.0, 0
    for i in range(len(ratios)):
        if i in window and i > 0 and in_a_row < bound:
            r, e = ratio * ratios[i], error + abs(1 - ratio * ratios[i])
            if e < threshold:
                ratio, error, in_a_row = r, e, in_a_row + 1
                skipped.append(i)
                continue
        ratio, error, in_a_row = 1.0, 0.0, 0
    return skipped


def calibration(ratios, preset="Step-Video-T2V", model="m"):
    return Calibration(model=model, preset=preset, steps=len(ratios), ratios=tuple(ratios), cfg=9.0, shift=13.0)


# ----------------------------------------------------------------------------- adaptive


def test_adaptive_skips_where_the_worked_example_says():
    """v_i = 1 + 0.05 i, dt 0.1, threshold 0.12 (worked by hand): the rate is 0.5 after steps 0 and 1, each
    step's estimate is then 0.05, so steps 2, 3 are reused and step 4 (0.15) calls; after it the rate is
    0.15 / 0.315 and the estimates are 0.048, 0.095, 0.143: steps 5, 6 reused, 7 calls; 8 reused, 9 is last."""
    cache = StepCache("adaptive", 0.12, start=0.0, end=1.0)
    skipped, stats = drive(cache, [1 + 0.05 * i for i in range(10)], x0=1.0)
    assert skipped == [2, 3, 5, 6, 8]
    assert stats["dit_calls"] == 5 and stats["skipped_calls"] == 5 and stats["skipped_steps"] == [3, 4, 6, 7, 9]


def test_adaptive_constant_velocity_skips_the_whole_window_and_needs_two_real_calls():
    """A velocity that never changes has rate 0: every step of the window after the first two real calls
    is reused; step 1 calls because one call gives no rate yet."""
    skipped, _ = drive(StepCache("adaptive", 0.01, start=0.0, end=1.0), [2.0] * 12)
    assert skipped == list(range(2, 11))


@pytest.mark.parametrize("seed", range(12))
def test_adaptive_matches_the_scalar_rule_on_random_sequences(seed):
    rnd = random.Random(seed)
    n = rnd.randint(8, 40)
    values = [rnd.uniform(0.5, 2.0) * rnd.choice([1, -1]) for _ in range(n)]
    dts = [rnd.uniform(0.01, 0.1) for _ in range(n)]
    threshold = rnd.choice([0.05, 0.2, 0.5, 1.0])
    start, end = rnd.choice([(0.0, 1.0), (0.2, 0.95), (0.3, 0.6)])
    bound = rnd.choice([None, 1, 2])
    cache = StepCache("adaptive", threshold, start=start, end=end, max_skips=bound)
    skipped, stats = drive(cache, values, dts, x0=0.7)
    assert skipped == adaptive_oracle(values, dts, 0.7, threshold, set(cache.window(n)), bound)
    assert stats["dit_calls"] + stats["skipped_calls"] == n


def test_adaptive_accumulates_and_resets_after_a_real_call():
    """Threshold 0.12 with per-step estimates 0.05: two skips, then a call (0.15 is over); a rule that did
    not accumulate would skip every step, one that did not reset after the call would never skip again."""
    skipped, _ = drive(StepCache("adaptive", 0.12, start=0.0, end=1.0), [1 + 0.05 * i for i in range(10)])
    assert 4 not in skipped and 7 not in skipped and {5, 6, 8} <= set(skipped)


# ----------------------------------------------------------------------------- calibrated


def test_calibrated_skips_where_the_worked_example_says():
    """ratios, threshold 0.1, at most 2 in a row: 1, 2 reused (error 0.01, 0.0398), 3 calls (a third in a
    row), 4 reused (ratio 1), 5 calls (error 0.15), 6 reused (0.05), 7 calls (0.05 + 0.0785), 8 reused."""
    ratios = [1.0, 0.99, 0.98, 0.97, 1.0, 0.85, 0.95, 0.97, 1.0, 1.0]
    cache = StepCache("calibrated", 0.1, start=0.0, end=1.0, calibration=calibration(ratios))
    skipped, _ = drive(cache, [5.0, -3.0, 0.1, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # the velocities do not matter
    assert skipped == [1, 2, 4, 6, 8]
    assert cache.skip_bound == 2


@pytest.mark.parametrize("seed", range(12))
def test_calibrated_matches_the_scalar_rule_on_random_ratios(seed):
    rnd = random.Random(100 + seed)
    n = rnd.randint(8, 50)
    ratios = [1.0] + [rnd.uniform(0.85, 1.1) for _ in range(n - 1)]
    threshold = rnd.choice([0.02, 0.05, 0.12, 0.3])
    bound = rnd.choice([1, 2, 3, 10])
    start, end = rnd.choice([(0.0, 1.0), (0.2, 0.95), (0.5, 0.8)])
    cache = StepCache("calibrated", threshold, start=start, end=end, max_skips=bound,
                      calibration=calibration(ratios))
    skipped, _ = drive(cache, [rnd.uniform(-1, 1) for _ in range(n)])
    assert skipped == calibrated_oracle(ratios, threshold, set(cache.window(n)), bound)


def test_calibration_must_have_the_run_step_count():
    cache = StepCache("calibrated", calibration=calibration([1.0] * 5))
    with pytest.raises(CalibrationNotFound, match="measured for 5 steps; this run has 6"):
        CacheRun(cache, 6, 1)
    with pytest.raises(ValueError, match="needs its calibration"):
        CacheRun(StepCache("calibrated"), 6, 1)


# ----------------------------------------------------------------------------- shared rules


@pytest.mark.parametrize("mode", ["adaptive", "calibrated"])
def test_threshold_zero_and_off_never_skip(mode):
    values = [1.0] * 20  # constant: the adaptive estimate is exactly 0, calibrated ratios exactly 1
    cal = calibration([1.0] * 20) if mode == "calibrated" else None
    assert drive(StepCache(mode, 0.0, start=0.0, end=1.0, calibration=cal), values)[0] == []
    assert drive(StepCache(), values)[0] == []
    assert drive(StepCache(mode, 5.0, start=0.0, end=1.0, calibration=cal, max_skips=100), values)[0]


@pytest.mark.parametrize("steps, start, end, window", [
    (10, 0.0, 1.0, [1, 2, 3, 4, 5, 6, 7, 8]),     # never the first, never the last
    (10, 0.2, 0.95, [2, 3, 4, 5, 6, 7, 8]),       # 0.2 <= i/10 < 0.95
    (50, 0.2, 0.95, list(range(10, 48))),
    (15, 0.2, 0.95, list(range(3, 14))),
    (10, 0.35, 0.6, [4, 5]),
    (10, 0.5, 0.5, []),
    (2, 0.0, 1.0, []),
    (1, 0.0, 1.0, []),
])
def test_window(steps, start, end, window):
    assert list(StepCache("adaptive", start=start, end=end).window(steps)) == window


@pytest.mark.parametrize("mode", ["adaptive", "calibrated"])
def test_nothing_outside_the_window_is_skipped_even_at_a_huge_threshold(mode):
    n = 20
    cal = calibration([1.0] * n) if mode == "calibrated" else None
    cache = StepCache(mode, 1e9, start=0.3, end=0.7, calibration=cal, max_skips=100)
    skipped, _ = drive(cache, [1.0 + 0.1 * i for i in range(n)])
    assert skipped == list(range(6, 14))  # all of 0.3 <= i/20 < 0.7, nothing else
    everything = StepCache(mode, 1e9, start=0.0, end=1.0, calibration=cal, max_skips=100)
    skipped, _ = drive(everything, [1.0 + 0.1 * i for i in range(n)])
    assert skipped == list(range(1 if mode == "calibrated" else 2, n - 1))  # the first and the last always call


def test_skipped_steps_count_every_cfg_call():
    skipped, stats = drive(StepCache("adaptive", 1e9, start=0.0, end=1.0), [1.0] * 6, calls_per_step=2)
    assert skipped == [2, 3, 4]
    assert stats["dit_calls"] == 6 and stats["skipped_calls"] == 6
    assert "6 of 12 DiT calls run, 6 skipped (steps 3, 4, 5)" in summary(stats)


def test_settings_are_checked():
    assert StepCache().mode == "off" and CACHE_MODES == ("off", "adaptive", "calibrated")
    for bad, match in [(dict(mode="fast"), "cache mode"), (dict(threshold=-1), "not be negative"),
                       (dict(threshold=float("nan")), "finite"), (dict(start=0.8, end=0.2), "start <= end"),
                       (dict(end=1.5), "start <= end"), (dict(max_skips=0), "max_skips")]:
        with pytest.raises(ValueError, match=match):
            StepCache(**bad)


def test_magnitude_ratio_is_the_mean_token_norm_ratio():
    a = torch.zeros(1, 1, 2, 1, 2)
    b = torch.zeros(1, 1, 2, 1, 2)
    a[..., 0], a[..., 1] = 1.0, 2.0          # token norms sqrt(2), 2 sqrt(2)
    b[..., 0], b[..., 1] = 3.0, 2.0          # token norms 3 sqrt(2), 2 sqrt(2): ratios 3 and 1
    assert magnitude_ratio(b, a) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- calibration files


def test_recorded_ratios_make_a_calibration():
    _, stats = drive(StepCache(record_ratios=True), [1.0, 2.0, 1.0, -1.0])
    assert stats["ratios"] == pytest.approx([1.0, 2.0, 0.5, 1.0]) and stats["skipped_calls"] == 0
    stats["model"] = "m"
    cal = calibration_from_stats(stats, preset="Step-Video-T2V", cfg=9, shift=13, seed=3)
    assert cal.key == ("m", "Step-Video-T2V", 4) and cal.measured["seed"] == 3
    with pytest.raises(ValueError, match="recorded no ratios"):
        calibration_from_stats({"dit_calls": 3}, preset="x", cfg=1, shift=1)


def test_calibration_json_round_trip_and_replacement(tmp_path):
    path = tmp_path / "sub" / "cal.json"
    first = calibration([1.0, 0.987654321, 1.0123456789], model="A")
    other = calibration([1.0, 0.5], model="B", preset="Step-Video-T2V-Turbo")
    save_calibration(path, first)
    save_calibration(path, other)
    assert load_calibrations(path) == [first, other]  # full precision: equal ratios
    again = calibration([1.0, 0.9, 0.9], model="A")
    save_calibration(path, again)  # same key: replaced, the other kept
    assert load_calibrations(path) == [other, again]
    data = json.loads(path.read_text())
    assert data["format"] == "stepvideo-step-cache" and data["version"] == 1 and len(data["entries"]) == 2
    assert find_calibration([tmp_path / "sub"], "A", "Step-Video-T2V", 3) == again  # a folder of *.json
    assert find_calibration([path], None, "Step-Video-T2V-Turbo", 2) == other


@pytest.mark.parametrize("model, preset, steps", [("Z", "Step-Video-T2V", 3), ("A", "Step-Video-T2V-Turbo", 3),
                                                  ("A", "Step-Video-T2V", 50)])
def test_a_key_mismatch_is_a_clear_error(tmp_path, model, preset, steps):
    save_calibration(tmp_path / "cal.json", calibration([1.0, 0.9, 0.9], model="A"))
    with pytest.raises(CalibrationNotFound) as err:
        find_calibration([tmp_path], model, preset, steps)
    text = str(err.value)
    assert f"preset {preset} and {steps} steps" in text and str(tmp_path) in text
    assert "found: A, Step-Video-T2V, 3 steps [cal.json]" in text
    assert "calibrate-cache" in text and "ships no calibration" in text


def test_unreadable_and_foreign_files_are_named(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CalibrationNotFound) as err:
        find_calibration([tmp_path, tmp_path / "missing"], "A", "Step-Video-T2V", 3)
    text = str(err.value)
    assert "bad.json: cannot read" in text and "other.json: not a step-cache calibration file" in text
    with pytest.raises(ValueError, match="3 steps needs 3 ratios"):
        Calibration(model="A", preset="p", steps=3, ratios=(1.0,))
