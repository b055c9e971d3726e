"""The headless pipeline on the tiny release: file resolution, generation, and equality with the node graph."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from stepvideo_core import NEGATIVE_PROMPT, CheckpointError
from stepvideo_core.pipeline import ModelFiles, StepVideoPipeline, VideoRequest, resolve_preset
from stepvideo_core.sampling import SamplingSettings, SizeError
from stepvideo_core.sampling.run import DiTSetup, plan_blocks
from stepvideo_core.tiny import TINY_RELEASE_DIT_CONFIG, cached_tiny_release, tiny_release_key

SIZE = dict(width=32, height=32, frames=17)
PROMPT = "A cat walks along the beach at sunset."


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root, created = cached_tiny_release(tmp_path_factory.mktemp("cache"))
    assert created
    return root


@pytest.fixture(scope="module")
def pipe(release):
    return StepVideoPipeline(ModelFiles.from_release(release, tiny=True), device="cpu")


def test_tiny_release_is_cached_once_and_consistent(release):
    again, created = cached_tiny_release(release.parents[1])
    assert again == release and not created
    assert release.parent.name == f"tiny-{tiny_release_key()}" and release.name == "stepvideo-t2v"
    assert {p.name for p in release.iterdir()} >= {"transformer", "vae", "step_llm", "hunyuan_clip"}
    assert TINY_RELEASE_DIT_CONFIG["caption_channels"] == [96, 48]
    assert tiny_release_key(seed=1) != tiny_release_key()


def test_model_files_from_a_release_with_overrides(release, tmp_path):
    files = ModelFiles.from_release(release)
    assert files.transformer == release and files.vae == release / "vae" / "vae_v2.safetensors"
    assert files.step_llm == release / "step_llm" and files.hunyuan_clip == release / "hunyuan_clip"
    assert ModelFiles.from_release(release.parent).transformer == release  # a folder holding stepvideo-t2v/
    turbo = tmp_path / "stepvideo-t2v-turbo"
    shutil.copytree(release / "transformer", turbo / "transformer")
    assert ModelFiles.from_release(release, transformer=turbo).transformer == turbo


def test_missing_files_are_all_named_before_loading(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        ModelFiles.from_release(tmp_path / "empty")
    message = str(info.value)
    assert "transformer:" in message and "vae:" in message and "text_encoders:" in message
    with pytest.raises(CheckpointError, match="not given"):
        ModelFiles.from_release(None, transformer=tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        ModelFiles.from_release(tmp_path / "nowhere")


def test_presets_and_plans():
    assert resolve_preset("turbo") == "Step-Video-T2V-Turbo" and resolve_preset("BASE") == "Step-Video-T2V"
    assert resolve_preset("Step-Video-T2V-Turbo") == "Step-Video-T2V-Turbo"
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("fast")
    from stepvideo_core.dit import StepVideoDiTConfig

    config = StepVideoDiTConfig()  # the released 30B model: 48 blocks
    run = SamplingSettings(992, 544, 204, steps=50, cfg=9.0, shift=13.0)
    full, fp8_weights = DiTSetup(torch.bfloat16), DiTSetup(torch.bfloat16, weight_format="fp8_scaled")
    assert plan_blocks(config, full, run, device=torch.device("cpu"))["blocks_on_device"] == 48
    gib = 1 << 30
    fp8 = plan_blocks(config, fp8_weights, run, device=torch.device("cuda"), free_bytes=22 * gib)
    bf16 = plan_blocks(config, full, run, device=torch.device("cuda"), free_bytes=22 * gib)
    assert bf16["fits"] and fp8["fits"] and bf16["blocks_on_device"] < fp8["blocks_on_device"] < 48
    fixed = plan_blocks(config, DiTSetup(torch.bfloat16, blocks_on_device=3), run, device=torch.device("cuda"),
                        free_bytes=22 * gib)
    assert fixed["blocks_on_device"] == 3
    with pytest.raises(ValueError, match="blocks_on_device"):
        DiTSetup(torch.bfloat16, blocks_on_device="most")


def test_generate_gives_uint8_frames_and_checks_first(pipe):
    steps = []
    result = pipe.generate(PROMPT, video=VideoRequest(preset="turbo", steps=2, seed=5, **SIZE),
                           progress=lambda phase, total: (lambda done, n: steps.append((phase, done, n))))
    assert result.frames.dtype == torch.uint8 and tuple(result.frames.shape) == (17, 32, 32, 3)
    assert result.settings["cfg"] == 5.0 and result.settings["shift"] == 17.0 and result.settings["steps"] == 2
    assert result.settings["negative"] == NEGATIVE_PROMPT and set(result.seconds) == {"text", "sample", "decode"}
    assert ("sampling", 2, 2) in steps and ("VAE decode", 1, 1) in steps and steps[-1][0] == "VAE decode"
    text_steps = [s for s in steps if s[0] == "text encoders"]
    assert text_steps[-1][1] == text_steps[-1][2]  # both prompts encoded, the bar ends full
    assert pipe._transformer is None and pipe._vae is None  # freed on return (keep_models off)
    with pytest.raises(SizeError, match="nearest valid: 16 or 32"):
        pipe.generate(PROMPT, video=VideoRequest(width=20, height=32, frames=17))
    with pytest.raises(ValueError, match="steps"):
        pipe.generate(PROMPT, video=VideoRequest(steps=0, **SIZE))


def test_without_guidance_the_negative_prompt_is_not_encoded(pipe, release):
    pos, neg, _ = pipe.encode(PROMPT, None)
    assert neg is None and pos["encoder_hidden_states"].shape[0] == 1
    keeping = StepVideoPipeline(ModelFiles.from_release(release), device="cpu", keep_models=True)
    result = keeping.generate(PROMPT, video=VideoRequest(cfg=1.0, steps=1, **SIZE))
    assert result.settings["negative"] is None and result.frames.shape[0] == 17
    model = keeping.transformer()
    keeping.generate(PROMPT, video=VideoRequest(cfg=1.0, steps=1, **SIZE))
    assert keeping.transformer() is model  # kept, not loaded again


def test_same_tensors_as_the_node_graph(pipe, release, pack, models_dir):
    """Text nodes -> model loader -> sampler -> VAE nodes give what the pipeline gives, from the same files."""
    (models_dir / "diffusion_models" / "stepvideo-t2v").symlink_to(release)
    (models_dir / "text_encoders" / "stepvideo-t2v").symlink_to(release)
    (models_dir / "vae" / "stepvideo").mkdir()
    (models_dir / "vae" / "stepvideo" / "vae_v2.safetensors").symlink_to(release / "vae" / "vae_v2.safetensors")
    mods = {name: sys.modules[f"{pack.__name__}.nodes.{name}"] for name in ("text", "model", "sampler", "vae")}
    result = lambda out: out["result"][0] if isinstance(out, dict) else out[0]  # noqa: E731
    te = result(mods["text"].StepVideoTextEncoderLoader().load("stepvideo-t2v", "stepvideo-t2v", "default", True,
                                                               "auto"))
    pos = result(mods["text"].StepVideoTextEncode().encode(te, PROMPT, True))
    neg = result(mods["text"].StepVideoNegativeTextEncode().encode(te, NEGATIVE_PROMPT))
    model = result(mods["model"].StepVideoModelLoader().load("stepvideo-t2v", "auto", "sdpa", "auto"))
    run = dict(**SIZE, steps=2, cfg=7.0, shift=13.0, seed=11)
    latent = result(mods["sampler"].StepVideoSampler().sample(model, pos, neg, "Step-Video-T2V", **run))
    vae = result(mods["vae"].StepVideoVAELoader().load("stepvideo/vae_v2.safetensors", "default"))
    images = result(mods["vae"].StepVideoVAEDecode().decode(vae, latent))

    ours_pos, ours_neg, _ = pipe.encode(PROMPT, NEGATIVE_PROMPT)
    for key, value in pos.dit_inputs().items():
        assert torch.equal(value, ours_pos[key]) and torch.equal(neg.dit_inputs()[key], ours_neg[key])
    latents, _ = pipe.sample(ours_pos, ours_neg, SamplingSettings(**run))
    assert torch.equal(latent["samples"], latents.transpose(1, 2))
    frames = pipe.decode(latents)
    assert frames.shape == images.shape and (images * 255 - frames.float()).abs().max() <= 1.0


def test_loras_are_applied_per_run_and_the_base_comes_back(release, tmp_path):
    """--lora / loras=: the same attach-for-the-run as the sampler node, validated before any model loads."""
    from stepvideo_core.tiny import write_tiny_lora

    lora, _ = write_tiny_lora(tmp_path / "style.safetensors", config=TINY_RELEASE_DIT_CONFIG, keys="comfy",
                              alpha=4.0, seed=3)
    files = ModelFiles.from_release(release)
    run = VideoRequest(cfg=1.0, steps=2, seed=7, **SIZE)
    plain = StepVideoPipeline(files, device="cpu", keep_models=True)
    styled = StepVideoPipeline(files, device="cpu", keep_models=True, loras=[(lora, 8.0)])
    base = plain.generate(PROMPT, video=run).frames
    first, second = styled.generate(PROMPT, video=run).frames, styled.generate(PROMPT, video=run).frames
    assert not torch.equal(first, base) and torch.equal(first, second)  # applied, and identical run to run
    reference = plain.transformer().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in styled.transformer().state_dict().items())  # base restored
    with pytest.raises(CheckpointError, match="LoRA file not found"):
        StepVideoPipeline(files, device="cpu", loras=[(tmp_path / "missing.safetensors", 1.0)])


def test_cli_lora_argument():
    from stepvideo_core.cli import parse_lora
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("dir/style.safetensors:0.6") == ("dir/style.safetensors", 0.6)
    assert parse_lora(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
