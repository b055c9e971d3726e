"""Image-to-video headless: ``generate --image`` on the embedded tiny TI2V default end to end, the pipeline's
image condition, and the refusals made from the file headers before any weight is read."""

from __future__ import annotations


import pytest
import torch

from stepvideo_core import image_condition, image_from_file
from stepvideo_core.condition import image_noise_generator
from stepvideo_core.pipeline import OFFICIAL_NEGATIVE, ModelFiles, StepVideoPipeline, VideoRequest
from stepvideo_core.text.encoder import TI2V_MAGIC, TI2V_NEGATIVE_PROMPT
from stepvideo_core.tiny import TI2V_TRANSFORMER_DIR, tiny_ti2v_transformer, write_tiny_image
from stepvideo_core.video_io import read_video_info
from tests.core.cli_run import run_cli


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """``generate --image`` with no --models into an empty cache: (code, stdout, stderr, mp4, cache, image)."""
    tmp = tmp_path_factory.mktemp("cli_ti2v")
    image = write_tiny_image(tmp / "first.png", width=80, height=48)
    cache, out = tmp / "cache", tmp / "out" / "i2v.mp4"
    code, stdout, stderr = run_cli(["generate", "--prompt", "一只猫在海滩上散步", "--image", str(image), "--out", str(out),
                                    "--cache", str(cache)])
    return code, stdout, stderr, out, cache, image


def release_of(cache):
    return next(cache.glob("tiny-*")) / "stepvideo-t2v"


def test_tiny_ti2v_default_writes_a_playable_mp4(first_run):
    code, stdout, stderr, out, _, image = first_run
    assert code == 0, stdout + stderr
    assert read_video_info(out) == {"frames": 17, "width": 64, "height": 64, "fps": 25.0, "codec": "h264",
                                    "pix_fmt": "yuv420p"}
    assert "embedded tiny default image-to-video (TI2V)" in stdout and f"from the image {image}" in stdout
    assert "Step-Video-TI2V: 3 steps, cfg 9, shift 13, motion score 5, seed 1234" in stdout
    assert "image condition: 80x48 image -> [1, 3, 8, 4, 4] latent" in stderr
    assert stdout.rstrip().endswith("it is noise, not a real video.")


def test_the_tiny_release_carries_a_ti2v_transformer(first_run):
    *_, cache, _ = first_run
    folder = release_of(cache) / TI2V_TRANSFORMER_DIR
    assert folder == tiny_ti2v_transformer(release_of(cache))
    assert (folder / "config.json").is_file() and list(folder.glob("diffusion_pytorch_model-*.safetensors"))


def test_image_for_a_t2v_transformer_is_refused_before_loading(first_run, tmp_path):
    *_, cache, image = first_run
    code, _, stderr = run_cli(["generate", "--prompt", "x", "--models", str(release_of(cache)), "--image", str(image),
                               "--out", str(tmp_path / "v.mp4")])
    assert code == 2 and not (tmp_path / "v.mp4").exists()
    assert stderr.startswith("error: an image was given (image-to-video, --image), but the transformer")
    assert "is Step-Video-T2V (text-to-video)" in stderr
    assert "text encoders loaded" not in stderr and "DiT loaded" not in stderr


def test_ti2v_transformer_without_an_image_is_refused_before_loading(first_run, tmp_path):
    *_, cache, _ = first_run
    release = release_of(cache)
    code, _, stderr = run_cli(["generate", "--prompt", "x", "--models", str(release), "--transformer",
                               str(release / TI2V_TRANSFORMER_DIR), "--out", str(tmp_path / "v.mp4")])
    assert code == 2 and "is Step-Video-TI2V (image-to-video): it needs a first-frame image (--image" in stderr
    assert "text encoders loaded" not in stderr


def test_bad_image_and_motion_score_without_image(first_run, tmp_path):
    *_, cache, _ = first_run
    code, _, stderr = run_cli(["generate", "--prompt", "x", "--cache", str(cache), "--image", str(tmp_path / "no.png")])
    assert code == 2 and "error: image file not found" in stderr and "text encoders loaded" not in stderr
    (tmp_path / "not.png").write_text("not an image")
    code, _, stderr = run_cli(["generate", "--prompt", "x", "--cache", str(cache), "--image",
                               str(tmp_path / "not.png")])
    assert code == 2 and "is not an image Pillow can read" in stderr
    code, _, stderr = run_cli(["generate", "--prompt", "x", "--models", str(release_of(cache)), "--motion-score", "3"])
    assert code == 2 and "motion_score is an image-to-video setting" in stderr
    code, _, stderr = run_cli(["generate", "--prompt", "x", "--models", str(release_of(cache)), "--preset", "ti2v"])
    assert code == 2 and "preset Step-Video-TI2V is for a Step-Video-TI2V (image-to-video) transformer" in stderr
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it while parsing
        run_cli(["generate", "--prompt", "x", "--cache", str(cache), "--image", "a.png", "--motion-score", "nan"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def pipe(first_run):
    *_, cache, _ = first_run
    release = release_of(cache)
    return StepVideoPipeline(ModelFiles.from_release(release, transformer=tiny_ti2v_transformer(release), tiny=True),
                             device="cpu", keep_models=True)


def test_the_pipeline_condition_is_image_from_file_then_image_condition(pipe, first_run):
    *_, image = first_run
    assert pipe.is_ti2v and pipe.check_mode(image) is True
    with pytest.raises(ValueError, match="needs a first-frame image"):
        pipe.check_mode(None)
    ours = pipe.encode_image(image, width=32, height=48, frames=34, seed=11)
    by_hand = image_condition(pipe.vae(), image_from_file(image), width=32, height=48, frames=34,
                              generator=torch.Generator().manual_seed(12))
    assert ours.shape == (1, 6, 8, 3, 2) and torch.equal(ours, by_hand)
    assert torch.count_nonzero(ours[:, 1:]) == 0 and torch.count_nonzero(ours[:, :1]) > 0
    assert torch.equal(ours, pipe.encode_image(image, width=32, height=48, frames=34, seed=11))  # seeded
    # the posterior noise is drawn from seed + 1, not from the run's own seed (see image_noise_generator)
    assert image_noise_generator(11).initial_seed() == 12


def test_the_pipeline_defaults_follow_the_ti2v_preset(pipe, first_run, monkeypatch):
    *_, image = first_run
    seen = {}

    def fake_encode(prompt, negative, add_magic, progress, magic=None):
        seen.update(prompt=prompt, negative=negative, magic=magic)
        raise RuntimeError("stop after the settings")

    monkeypatch.setattr(pipe, "encode", fake_encode)
    monkeypatch.setattr(pipe, "check_memory", lambda settings: seen.update(memory=settings))
    with pytest.raises(RuntimeError, match="stop after the settings"):
        pipe.generate("a cat", video=VideoRequest(width=32, height=32), image=image)
    memory = seen["memory"]
    assert (memory.width, memory.height, memory.frames, memory.guided) == (32, 32, 102, True)  # TI2V's 102 frames
    assert seen["magic"] == TI2V_MAGIC and seen["negative"] == TI2V_NEGATIVE_PROMPT
    with pytest.raises(ValueError, match="motion_score must be a finite number"):
        pipe.generate("a cat", video=VideoRequest(width=32, height=32, frames=17, motion_score=float("nan")),
                      image=image)
    with pytest.raises(ValueError, match="needs a first-frame image"):
        pipe.generate("a cat", OFFICIAL_NEGATIVE, VideoRequest(width=32, height=32, frames=17))


def test_the_pipeline_generates_from_an_image_tensor(pipe, first_run):
    """A short real run (1 step, no guidance): settings say TI2V, and the image changes the video."""
    *_, image = first_run
    pixels = image_from_file(image)
    video = VideoRequest(width=32, height=32, frames=17, steps=1, cfg=1.0, seed=3, motion_score=2.0)
    result = pipe.generate("a cat", video=video, image=pixels)
    assert result.frames.shape == (17, 32, 32, 3) and result.frames.dtype == torch.uint8
    assert result.settings["mode"] == "ti2v" and result.settings["motion_score"] == 2.0
    assert result.settings["preset"] == "Step-Video-TI2V" and result.settings["image"] == "tensor"
    other = pipe.generate("a cat", video=video, image=-pixels)
    assert not torch.equal(result.frames, other.frames)
