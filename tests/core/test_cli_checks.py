"""``generate`` refuses bad input early and never exits 0 with a black video.

NaN settings are refused at parse time (argparse ``type=``, naming the flag); adapters are opened
and checked before any model weight is read; a run whose latents go non-finite prints ``error: ...``
and exits non-zero.  "Before any weight" is checked by making the loaders fail the test if called.
"""

from __future__ import annotations

import shutil

import pytest

import stepvideo_core.pipeline as pipeline_mod
from stepvideo_core.cli import main
from stepvideo_core.tiny import TINY_RELEASE_DIT_CONFIG, cached_tiny_release, write_tiny_lora
from tests.core.test_non_finite import nan_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding the tiny default release (written once for this module)."""
    folder = tmp_path_factory.mktemp("cli-checks") / "cache"
    cached_tiny_release(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapters for the tiny release: good, with a NaN value, not safetensors, for another model."""
    folder = tmp_path_factory.mktemp("adapters")
    write_tiny_lora(folder / "good.safetensors", config=TINY_RELEASE_DIT_CONFIG, keys="comfy", alpha=4.0)
    _, key = nan_lora(folder / "nan_values.safetensors", config=TINY_RELEASE_DIT_CONFIG)
    (folder / "garbage.safetensors").write_bytes(b"this is not a safetensors file" * 8)
    write_tiny_lora(folder / "other_model.safetensors", keys="comfy")  # the 64-channel tiny DiT, not the release's
    return folder, key


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make reading any model weight fail the test: the checks under test must come first."""
    def refuse(what):
        def loader(*_args, **_kwargs):
            raise AssertionError(f"the {what} was loaded before the bad input was reported")
        return loader
    monkeypatch.setattr(pipeline_mod, "load_text_encoder", refuse("text encoder"))
    monkeypatch.setattr(pipeline_mod, "load_transformer", refuse("DiT"))
    monkeypatch.setattr(pipeline_mod, "load_vae", refuse("VAE"))


def generate(cache, tmp_path, *extra):
    return main(["generate", "--prompt", "x", "--cache", str(cache), "--steps", "1", "--out",
                 str(tmp_path / "video.mp4"), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--shift", "nan"], "argument --shift: must be a finite number, got 'nan'"),
    (["--cfg", "nan"], "argument --cfg: must be a finite number, got 'nan'"),
    (["--cfg", "inf"], "argument --cfg: must be a finite number, got 'inf'"),
    (["--lora", "good.safetensors:nan"], "argument --lora: 'good.safetensors:nan': the strength must be a finite "
                                         "number, got 'nan'"),
    (["--lora", "good.safetensors:abc"], "argument --lora: 'good.safetensors:abc': the strength must be a number, "
                                         "got 'abc'"),
])
def test_bad_numbers_are_refused_when_the_arguments_are_parsed(cache, tmp_path, capsys, no_model_loads, extra,
                                                               message):
    with pytest.raises(SystemExit) as exit_info:
        generate(cache, tmp_path, *extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert "not found" not in err and not (tmp_path / "video.mp4").exists()


@pytest.mark.parametrize("name, message", [
    ("nan_values.safetensors", "nan_values.safetensors: tensor '{key}' holds 1 NaN/Inf value"),
    ("garbage.safetensors", "garbage.safetensors (240 bytes) is not a readable safetensors file"),
    ("other_model.safetensors", "LoRA other_model.safetensors does not fit this Step-Video DiT"),
])
def test_bad_adapters_are_reported_before_any_model_loads(cache, adapters, tmp_path, capsys, no_model_loads, name,
                                                          message):
    folder, key = adapters
    assert generate(cache, tmp_path, "--lora", str(folder / name)) == 2
    err = capsys.readouterr().err
    assert f"{message.format(key=key)}" in err and err.count("error: ") == 1, err
    assert "text encoders" not in err and not (tmp_path / "video.mp4").exists()


def test_a_good_adapter_with_a_strength_still_runs(cache, adapters, tmp_path, capsys):
    folder, _ = adapters
    assert generate(cache, tmp_path, "--lora", f"{folder / 'good.safetensors'}:0.5", "--cfg", "1") == 0
    assert "LoRA good.safetensors (strength 0.5)" in capsys.readouterr().err


def test_non_finite_latents_fail_the_run(cache, tmp_path, capsys, monkeypatch):
    real_loader = pipeline_mod.load_transformer

    def overflowing(*args, **kwargs):
        model = real_loader(*args, **kwargs)
        model.register_forward_hook(lambda _m, _a, out: out * float("inf"))
        return model
    monkeypatch.setattr(pipeline_mod, "load_transformer", overflowing)
    assert generate(cache, tmp_path, "--cfg", "1") != 0
    err = capsys.readouterr().err
    assert "error: the latents became non-finite (NaN/Inf) at step 1/1" in err, err
    assert not (tmp_path / "video.mp4").exists()


def test_missing_clip_folder_names_the_flag(cache, tmp_path, capsys, no_model_loads):
    release = next(cache.glob("tiny-*")) / "stepvideo-t2v"
    text = tmp_path / "text"
    shutil.copytree(release / "step_llm", text / "step_llm")  # hunyuan_clip/ left out
    assert main(["generate", "--prompt", "x", "--models", str(release), "--text-encoders", str(text)]) == 2
    err = capsys.readouterr().err
    assert "no hunyuan_clip/ folder" in err and "--text-encoders" in err and "clip_dir" not in err, err


def test_python_callers_still_read_the_argument_name(tmp_path):
    from stepvideo_core.checkpoint import CheckpointError
    from stepvideo_core.text.encoder import resolve_text_encoder_dirs
    from stepvideo_core.tiny import write_tiny_step_llm

    write_tiny_step_llm(tmp_path / "step_llm", tokenizer=False)
    with pytest.raises(CheckpointError, match="no hunyuan_clip/ folder next to .*; pass clip_dir"):
        resolve_text_encoder_dirs(tmp_path / "step_llm")


def test_a_run_that_cannot_fit_in_ram_is_refused_before_any_model_loads(cache, tmp_path, capsys, monkeypatch,
                                                                        no_model_loads):
    monkeypatch.setattr(pipeline_mod, "available_host_bytes", lambda: 21 * 2 ** 30)
    code = generate(cache, tmp_path, "--width", "4096", "--height", "4096", "--frames", "1020")
    err = capsys.readouterr().err
    assert code == 2 and "error: refused before allocating: does not fit in RAM" in err, err
    assert "GiB available" in err and "what fits: 4096x4096 with at most" in err
    assert not (tmp_path / "video.mp4").exists()
