"""StepVideoSampler's step-cache inputs: optional (saved API workflows without them still validate), off by
default and then the uncached latents bit for bit, the summary counts the DiT calls, the calibrated mode reads
models/stepvideo_cache/*.json and fails clearly without a match, a skipped step streams no weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepvideo_core.offload import simulate
from stepvideo_core.offload.planner import GiB
from stepvideo_core.sampling.cache import CACHE_FOLDER, Calibration, model_identity, save_calibration
from tests.core.sampling.conftest import conditioning

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = dict(width=32, height=48, frames=17)
CUDA = torch.device("cuda", 0)


def run(sampler_mod, model, **kw):
    args = dict(preset="Step-Video-T2V-Turbo", **SIZE, steps=6, cfg=0.0, shift=0.0, seed=3)
    args.update(kw)
    out = sampler_mod.StepVideoSampler().sample(model=model, positive=conditioning(1), negative=conditioning(2),
                                                **args)
    (latent,) = out["result"]
    return latent["samples"], out["ui"]["text"][0]


def test_cache_inputs_are_optional_with_off_by_default(sampler_mod):
    spec = sampler_mod.StepVideoSampler.INPUT_TYPES()
    assert not {"cache", "cache_threshold", "cache_start", "cache_end"} & set(spec["required"])
    optional = spec["optional"]
    assert optional["cache"][0] == ["off", "adaptive", "calibrated"] and optional["cache"][1]["default"] == "off"
    assert optional["cache_threshold"][0] == "FLOAT" and optional["cache_threshold"][1]["min"] == 0.0
    assert (optional["cache_start"][1]["default"], optional["cache_end"][1]["default"]) == (0.2, 0.95)
    assert all(optional[k][1]["max"] == 1.0 for k in ("cache_start", "cache_end"))
    assert "models/stepvideo_cache" in optional["cache"][1]["tooltip"]
    assert "calibrate-cache" in optional["cache"][1]["tooltip"]


def test_off_is_the_uncached_node_and_the_summary_counts_calls(sampler_mod, base):
    plain, text = run(sampler_mod, base)  # no cache inputs at all (an older saved workflow)
    off, text_off = run(sampler_mod, base, cache="off", cache_threshold=5.0)
    assert torch.equal(plain, off)
    assert "step cache off: 6 of 6 DiT calls run, 0 skipped" in text and text_off.endswith(text.split("; ")[-1])
    cached, text = run(sampler_mod, base, cache="adaptive", cache_threshold=1e9, cache_start=0.0, cache_end=1.0)
    # steps 1 and 2 call (the rate needs two calls), 3-5 reuse, the last one (6) always calls
    assert "step cache adaptive (threshold 1e+09, steps 0%-100%): 3 of 6 DiT calls run, 3 skipped (steps 3, 4, 5)" \
        in text
    assert not torch.equal(cached, plain)


def test_bad_cache_settings_are_refused(sampler_mod, base):
    with pytest.raises(ValueError, match="start <= end"):
        run(sampler_mod, base, cache="adaptive", cache_start=0.9, cache_end=0.1)
    with pytest.raises(ValueError, match="cache must be one of"):
        run(sampler_mod, base, cache="fast")


def test_calibrated_reads_models_stepvideo_cache_and_fails_clearly_without_a_match(sampler_mod, bridge, base,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv(bridge.ENV_MODELS_DIR, str(tmp_path))
    folder = tmp_path / "stepvideo_cache"
    with pytest.raises(ValueError) as err:
        run(sampler_mod, base, cache="calibrated")
    text = str(err.value)
    assert "no step-cache calibration" in text and str(folder) in text and "calibrate-cache" in text
    assert "Step-Video-T2V-Turbo and 6 steps" in text
    ident = model_identity(base.transformer)
    save_calibration(folder / "mine.json", Calibration(model=ident, preset="Step-Video-T2V", steps=6,
                                                       ratios=(1.0,) * 6))  # another preset: still no match
    with pytest.raises(ValueError, match=r"found: .*Step-Video-T2V, 6 steps \[mine.json\]"):
        run(sampler_mod, base, cache="calibrated")
    save_calibration(folder / "mine.json", Calibration(model=ident, preset="Step-Video-T2V-Turbo", steps=6,
                                                       ratios=(1.0,) * 6))
    latents, text = run(sampler_mod, base, cache="calibrated", cache_threshold=0.5, cache_start=0.0, cache_end=1.0)
    assert "step cache calibrated (threshold 0.5, steps 0%-100%, at most 2 in a row): 3 of 6 DiT calls run, " \
           "3 skipped (steps 2, 3, 5)" in text
    assert torch.isfinite(latents).all()


def test_comfyui_models_folder_is_searched(bridge, monkeypatch, tmp_path):
    import types
    fake = types.SimpleNamespace(models_dir=str(tmp_path / "models"),
                                 get_folder_paths=lambda kind: (_ for _ in ()).throw(KeyError(kind)))
    monkeypatch.setitem(bridge._MODULES, "folder_paths", fake)
    assert bridge.step_cache_dirs() == [tmp_path / "models" / "stepvideo_cache"]
    assert bridge.STEP_CACHE_FOLDER == CACHE_FOLDER
    fake.get_folder_paths = lambda kind: [str(tmp_path / "extra")]
    monkeypatch.setenv(bridge.ENV_MODELS_DIR, str(tmp_path / "env"))
    assert bridge.step_cache_dirs() == [tmp_path / "extra", tmp_path / "models" / "stepvideo_cache",
                                        tmp_path / "env" / "stepvideo_cache"]


def test_node_streams_no_weights_for_skipped_steps(sampler_mod, types_mod, fake_gpu, sample_calls):
    """On a (fake) GPU with one of five blocks resident, the streamer's trace of a cached run is the schedule
    of the DiT calls that ran: the skipped steps fetched nothing (4 streamed blocks per skipped call saved)."""
    from stepvideo_core.tiny import TINY_DIT_CONFIG
    from tests.core.sampling.conftest import tiny_model
    fake_gpu(80 * GiB)
    dit = tiny_model(torch.float32, config=dict(TINY_DIT_CONFIG, num_layers=5))
    handle = types_mod.StepVideoModelHandle(transformer=dit, dtype=torch.float32, device=CUDA,
                                            offload_device=torch.device("cpu"), attention="sdpa",
                                            source=Path("tiny"), blocks_on_device="1")
    plain = lambda trace: [(a.kind, a.block, a.slot) for a in trace]  # noqa: E731 (the pack's own Action class)
    schedule = lambda calls: [(a.kind, a.block, a.slot) for p in simulate(5, 1, calls) for a in p]  # noqa: E731
    _, text = run(sampler_mod, handle, cache="adaptive", cache_threshold=1e9, cache_start=0.0, cache_end=1.0)
    streamer = sample_calls[-1]["streamer"]
    assert streamer.streamed == [1, 2, 3, 4] and "3 of 6 DiT calls run" in text
    assert plain(streamer.trace) == schedule(3)
    cached_fetches = sum(a.kind == "fetch" for a in streamer.trace)
    run(sampler_mod, handle)
    uncached = sample_calls[-1]["streamer"].trace
    assert plain(uncached) == schedule(6)
    assert sum(a.kind == "fetch" for a in uncached) - cached_fetches == 3 * 4


def test_progress_and_previews_every_step(sampler_mod, base, bridge, monkeypatch):
    updates = []

    class Bar:
        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total))

    monkeypatch.setattr(bridge, "progress_bar", lambda total: Bar())
    run(sampler_mod, base, cache="adaptive", cache_threshold=1e9, cache_start=0.0, cache_end=1.0)
    assert updates == [(i, 6) for i in range(1, 7)]
