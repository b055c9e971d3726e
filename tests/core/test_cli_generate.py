"""``python -m stepvideo_core generate``: the README's main job, end to end on the embedded tiny default."""

from __future__ import annotations

import io

import pytest

from stepvideo_core.cli import TextProgress, main
from stepvideo_core.tiny import CACHE_ENV, default_cache_dir
from stepvideo_core.video_io import read_video_info


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One CLI run into an empty cache folder: (exit code, stdout, stderr, mp4 path, cache folder)."""
    tmp = tmp_path_factory.mktemp("cli")
    cache, out = tmp / "cache", tmp / "out" / "video.mp4"
    with pytest.MonkeyPatch.context() as mp:
        stdout, stderr = io.StringIO(), io.StringIO()
        mp.setattr("sys.stdout", stdout)
        mp.setattr("sys.stderr", stderr)
        code = main(["generate", "--prompt", "一只猫在海滩上散步 at sunset", "--out", str(out), "--cache", str(cache)])
    return code, stdout.getvalue(), stderr.getvalue(), out, cache


def test_tiny_default_writes_a_playable_mp4(first_run):
    code, stdout, _, out, _ = first_run
    assert code == 0, stdout
    assert read_video_info(out) == {"frames": 17, "width": 64, "height": 64, "fps": 25.0, "codec": "h264",
                                    "pix_fmt": "yuv420p"}
    assert f"Wrote {out}: 17 frames, 64x64, 25 fps" in stdout


def test_says_plainly_that_it_is_a_smoke_test(first_run):
    _, stdout, _, _, cache = first_run
    assert "embedded tiny default" in stdout and f"written to {next(cache.glob('tiny-*'))}" in stdout
    assert stdout.rstrip().endswith("it is noise, not a real video.")
    assert "Step-Video-T2V: 3 steps, cfg 9, shift 13, seed 1234" in stdout


def test_progress_and_phases_go_to_stderr(first_run):
    _, _, stderr, _, _ = first_run
    for phase in ("text encoders", "sampling", "VAE decode"):
        assert phase in stderr
    assert "sampling       [########################] 3/3" in stderr
    assert "DiT loaded" in stderr and "block plan: all 2 blocks in RAM" in stderr


def test_second_run_reuses_the_cache_and_takes_options(first_run, tmp_path, capsys):
    *_, cache = first_run
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    out = tmp_path / "turbo.mp4"
    assert main(["generate", "--prompt", "a red car", "--out", str(out), "--cache", str(cache), "--preset", "turbo",
                 "--steps", "1", "--cfg", "1", "--seed", "7", "--width", "32", "--height", "48", "--fps", "8",
                 "--no-magic"]) == 0
    stdout = capsys.readouterr().out
    assert "cached in" in stdout and "Step-Video-T2V-Turbo: 1 steps, cfg 1, shift 17, seed 7" in stdout
    assert read_video_info(out)["width"] == 32 and read_video_info(out)["fps"] == 8.0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


def test_models_folder_is_used_and_errors_are_short(first_run, tmp_path, capsys):
    *_, cache = first_run
    release = next(cache.glob("tiny-*")) / "stepvideo-t2v"
    assert main(["generate", "--prompt", "x", "--models", str(release), "--width", "40", "--out",
                 str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr()
    assert err.err.startswith("error: invalid video size: width must be a positive multiple of 16, got 40")
    assert "SMOKE TEST" not in err.out and not (tmp_path / "v.mp4").exists()
    assert main(["generate", "--prompt", "x", "--models", str(tmp_path / "none")]) == 2
    assert "error: --models: no such folder" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--transformer", str(release)]) == 2
    assert "vae: not given" in capsys.readouterr().err


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().parts[-2:] == (".cache", "stepvideo")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_text_progress_bar():
    log = io.StringIO()
    bar = TextProgress("sampling", 20, log, width=10)
    for i in range(1, 21):
        bar(i, 20)
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("sampling       [##########] 20/20")  # first, then per tenth
    tty = FakeTerminal()
    bar = TextProgress("decode", 4, tty, width=4)
    bar(1, 4)
    bar(4, 4)
    assert tty.getvalue().startswith("\rdecode         [#---] 1/4") and tty.getvalue().endswith("s\n")
    assert tty.getvalue().count("\n") == 1
