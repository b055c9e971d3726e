"""The compile option's way in: ``generate --compile``, :class:`StepVideoPipeline` ``compile=``, end to end."""

from __future__ import annotations

import argparse
import io

import pytest
import torch

from stepvideo_core import cli
from stepvideo_core import pipeline as pipeline_mod
from stepvideo_core.compile import CompileSettings
from stepvideo_core.pipeline import ModelFiles, StepVideoPipeline
from stepvideo_core.sampling import SamplingSettings
from stepvideo_core.tiny import cached_tiny_release
from stepvideo_core.video_io import read_video_info
from tests.capabilities import require_inductor
from tests.core.sampling.conftest import conditioning

pytestmark = pytest.mark.usefixtures("one_thread")


def generate_args(*argv):
    parser = argparse.ArgumentParser()
    cli.add_generate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", "--prompt", "a cat", *argv])


def test_compile_flag_parses():
    assert generate_args().compile == "off"
    assert generate_args("--compile").compile == "blocks"
    assert generate_args("--compile", "blocks").compile == "blocks"
    assert generate_args("--compile", "off").compile == "off"
    with pytest.raises(SystemExit):
        generate_args("--compile", "model")
    assert cli.COMPILE_MODES == __import__("stepvideo_core.compile", fromlist=["MODES"]).MODES


def test_the_flag_reaches_the_pipeline(monkeypatch):
    seen = {}

    class Spy:
        def __init__(self, files, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(pipeline_mod, "StepVideoPipeline", Spy)
    cli.make_pipeline(generate_args("--compile"), files=None)
    assert seen["compile"] == "blocks"
    cli.make_pipeline(generate_args(), files=None)
    assert seen["compile"] == "off"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root, _ = cached_tiny_release(tmp_path_factory.mktemp("cache"))
    return root


def test_pipeline_checks_the_choice_before_loading(release):
    files = ModelFiles.from_release(release, tiny=True)
    assert StepVideoPipeline(files, device="cpu", compile="blocks").compile == CompileSettings(mode="blocks")
    assert not StepVideoPipeline(files, device="cpu").compile.enabled
    with pytest.raises(ValueError, match="unknown compile mode"):
        StepVideoPipeline(files, device="cpu", compile="everything")


def test_pipeline_sample_runs_the_blocks_compiled(release):
    """The pipeline's sampling run, compiled (a counting backend: dynamo's graph without inductor) == eager."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    files = ModelFiles.from_release(release, tiny=True)
    run = SamplingSettings(width=32, height=32, frames=17, steps=3, cfg=5.0, shift=13.0, seed=1)
    pos, neg = conditioning(1, valid=5), conditioning(2, valid=2)
    eager, _ = StepVideoPipeline(files, device="cpu").sample(pos, neg, run)
    pipe = StepVideoPipeline(files, device="cpu", compile=CompileSettings(mode="blocks", backend=counting))
    for _ in range(2):
        latents, _ = pipe.sample(pos, neg, run)
        assert float((latents - eager).norm() / eager.norm()) <= 1e-5
        state = pipe.last_compile
        assert state.fallback is None and state.compiled_calls == 2 * (run.steps - 1)  # 2 blocks; step 1 eager
    assert len(graphs) == 1


def test_generate_compile_end_to_end(tmp_path):
    """``generate --compile`` on the tiny default: inductor compiles the blocks, the mp4 is written, the run says so."""
    require_inductor()
    out = tmp_path / "video.mp4"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", stdout)
        mp.setattr("sys.stderr", stderr)
        code = cli.main(["generate", "--prompt", "a cat", "--out", str(out), "--tiny-cache", str(tmp_path / "tiny"),
                         "--steps", "2", "--compile"])
    text = stdout.getvalue()
    assert code == 0, text + stderr.getvalue()
    assert read_video_info(out)["frames"] == 17
    assert "compiled blocks:" in text and "2 compiled and 2 eager block calls" in text, text
    assert "compile failed" not in text + stderr.getvalue()
    assert torch.get_num_threads() == 1  # the module's one-thread fixture still holds (nothing reset it)
