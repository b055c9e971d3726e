"""``generate --cache ...`` and ``calibrate-cache`` end to end on the embedded tiny default: the calibration
JSON is written and read back, the summary counts the DiT calls, a missing calibration fails before anything
loads, bad settings are refused, TI2V runs with the cache, the old ``--cache DIR`` still names the tiny folder."""

from __future__ import annotations

import json

import pytest

from stepvideo_core.cli import main
from stepvideo_core.sampling.cache import load_calibrations
from stepvideo_core.tiny import write_tiny_image
from tests.core.cli_run import run_cli


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """``calibrate-cache --steps 6`` into an empty tiny-model folder: (code, stdout, stderr, json, tiny folder)."""
    tmp = tmp_path_factory.mktemp("cli_cache")
    tiny, out = tmp / "tiny", tmp / "cal" / "step_cache.json"
    code, stdout, stderr = run_cli(["calibrate-cache", "--tiny-cache", str(tiny), "--steps", "6", "--out", str(out)])
    return code, stdout, stderr, out, tiny


def generate(tmp_path, tiny, *flags):
    return run_cli(["generate", "--prompt", "a cat", "--tiny-cache", str(tiny), "--out", str(tmp_path / "v.mp4"),
                    *flags])


def test_calibrate_cache_writes_the_calibration_json(calibrated):
    code, stdout, stderr, out, _ = calibrated
    assert code == 0, stdout + stderr
    (entry,) = load_calibrations(out)
    assert entry.preset == "Step-Video-T2V" and entry.steps == 6 and entry.ratios[0] == 1.0
    assert entry.model.startswith("Step-Video-T2V/") and entry.label == "stepvideo-t2v"
    assert entry.cfg == 9.0 and entry.shift == 13.0 and entry.measured["width"] == 64
    assert json.loads(out.read_text())["format"] == "stepvideo-step-cache"
    assert f"Wrote the step-cache calibration of {entry.model}" in stdout and "SMOKE TEST" in stdout
    assert "sampling       [########################] 6/6" in stderr  # the progress bar, as generate
    assert "VAE decode" not in stderr  # no video is needed


def test_generate_with_the_calibration(calibrated, tmp_path):
    *_, out, tiny = calibrated
    code, stdout, stderr = generate(tmp_path, tiny, "--steps", "6", "--cache", "calibrated", "--cache-file", str(out),
                                    "--cache-threshold", "1e9", "--cache-start", "0", "--cache-end", "1")
    assert code == 0, stdout + stderr
    # at most 2 in a row, never the first or the last: 2, 3 reused, 4 calls, 5 reused, 6 calls
    assert ("step cache calibrated (threshold 1e+09, steps 0%-100%, at most 2 in a row): 3 of 6 DiT calls run, "
            "3 skipped (steps 2, 3, 5)") in stdout
    assert (tmp_path / "v.mp4").is_file()


def test_a_missing_calibration_fails_before_anything_loads(calibrated, tmp_path):
    *_, out, tiny = calibrated
    code, stdout, stderr = generate(tmp_path, tiny, "--steps", "5", "--cache", "calibrated", "--cache-file", str(out))
    assert code == 2
    assert "no step-cache calibration for any model, preset Step-Video-T2V and 5 steps" in stderr
    assert "found: Step-Video-T2V/" in stderr and "calibrate-cache" in stderr
    assert "text encoders" not in stderr and "DiT loaded" not in stderr
    code, _, stderr = generate(tmp_path, tiny, "--cache", "calibrated", "--cache-file", str(tmp_path / "none.json"))
    assert code == 2 and "no step-cache calibration" in stderr and "none.json" in stderr


def test_adaptive_and_off_summaries(calibrated, tmp_path):
    *_, tiny = calibrated
    code, stdout, stderr = generate(tmp_path, tiny, "--steps", "6", "--cache", "adaptive", "--cache-threshold",
                                    "1e9", "--cache-start", "0", "--cache-end", "1")
    assert code == 0, stdout + stderr
    assert "step cache adaptive (threshold 1e+09, steps 0%-100%): 3 of 6 DiT calls run, 3 skipped (steps 3, 4, 5)" \
        in stdout
    code, stdout, _ = generate(tmp_path, tiny)
    assert code == 0 and "step cache off: 3 of 3 DiT calls run, 0 skipped" in stdout


def test_bad_cache_settings_are_refused(calibrated, tmp_path):
    *_, tiny = calibrated
    code, _, stderr = generate(tmp_path, tiny, "--cache", "adaptive", "--cache-start", "0.9", "--cache-end", "0.2")
    assert code == 2 and "start <= end" in stderr
    with pytest.raises(SystemExit):
        generate(tmp_path, tiny, "--cache", "adaptive", "--cache-threshold", "nan")


def test_ti2v_generates_with_the_cache(calibrated, tmp_path):
    *_, tiny = calibrated
    image = write_tiny_image(tmp_path / "first.png", width=80, height=48)
    code, stdout, stderr = generate(tmp_path, tiny, "--image", str(image), "--steps", "6", "--cache", "adaptive",
                                    "--cache-threshold", "1e9", "--cache-start", "0")
    assert code == 0, stdout + stderr
    assert "Step-Video-TI2V: 6 steps" in stdout and "3 of 6 DiT calls run, 3 skipped" in stdout


def test_the_old_cache_folder_flag_still_names_the_tiny_folder(calibrated, tmp_path):
    *_, tiny = calibrated
    code, stdout, stderr = run_cli(["generate", "--prompt", "x", "--cache", str(tiny), "--steps", "1",
                                    "--out", str(tmp_path / "v.mp4")])
    assert code == 0, stdout + stderr
    assert f"cached in {next(tiny.glob('tiny-*'))}" in stdout
    assert f"--cache {tiny} is read as the tiny model's folder (now --tiny-cache)" in stderr
    assert "step cache off: 1 of 1 DiT calls run" in stdout


def test_help_says_the_pack_ships_no_calibration(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate-cache", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ships no calibration it has not measured" in text and "models/stepvideo_cache/" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--cache {off,adaptive,calibrated}" in text and "the pack ships none it has not measured" in text


def test_a_calibration_made_with_a_lora_is_keyed_by_the_base_weights(calibrated, tmp_path):
    """A LoRA merged for the run changes weights in place; the key is still the base model's (the sampler
    node and generate look it up before attaching adapters), and the entry records the LoRA."""
    from stepvideo_core.tiny import TINY_RELEASE_DIT_CONFIG, write_tiny_lora
    *_, out, tiny = calibrated
    lora, _ = write_tiny_lora(tmp_path / "style.safetensors", config=TINY_RELEASE_DIT_CONFIG, keys="comfy")
    mine = tmp_path / "with_lora.json"
    code, stdout, stderr = run_cli(["calibrate-cache", "--tiny-cache", str(tiny), "--steps", "6", "--out", str(mine),
                                    "--lora", f"{lora}:0.7"])
    assert code == 0, stdout + stderr
    (base,), (entry,) = load_calibrations(out), load_calibrations(mine)
    assert entry.model == base.model and entry.measured["loras"] == ["style.safetensors:0.7"]
    assert entry.ratios != base.ratios  # measured with the LoRA
    code, stdout, stderr = generate(tmp_path, tiny, "--steps", "6", "--cache", "calibrated", "--cache-file", str(mine),
                                    "--lora", f"{lora}:0.7")
    assert code == 0 and "step cache calibrated" in stdout, stdout + stderr
