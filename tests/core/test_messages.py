"""Checks in the right order, messages that name the real cause.

* ``--lora FILE[:STRENGTH]`` is parsed strictly (Windows drive letters kept);
* the pipeline opens and validates every adapter before any model weight is read, against the
  DiT built on the meta device, and reuses that binding for the loaded (also fp8) model;
* a ``pytorch_model.bin`` that references code is refused as such (never unpickled), a damaged
  one as truncated/corrupt;
* a config.json that contradicts the weights names the fields that differ, before the config's own
  validation could complain about a value the weights never had.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import stepvideo_core.lora.adapter as adapter_mod
import stepvideo_core.pipeline as pipeline_mod
from stepvideo_core import build_transformer, load_step_llm, load_transformer
from stepvideo_core.checkpoint import CheckpointError
from stepvideo_core.cli import parse_lora
from stepvideo_core.lora import LoraError, load_lora
from stepvideo_core.pipeline import ModelFiles, StepVideoPipeline, VideoRequest
from stepvideo_core.text.clip import load_hunyuan_clip
from stepvideo_core.tiny import (TINY_DIT_CONFIG, TINY_RELEASE_DIT_CONFIG, cached_tiny_release, write_tiny_dit,
                                 write_tiny_hunyuan_clip, write_tiny_lora, write_tiny_step_llm)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- --lora FILE[:STRENGTH] ---------------------------------------------------------------------

@pytest.mark.parametrize("spec, parsed", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("dir/style.safetensors:0.6", ("dir/style.safetensors", 0.6)),
    ("style.safetensors:-1e-1", ("style.safetensors", -0.1)),
    (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", 1.0)),
    (r"C:\loras\style.safetensors:0.5", (r"C:\loras\style.safetensors", 0.5)),
    ("C:/loras/style.safetensors:2", ("C:/loras/style.safetensors", 2.0)),
    ("odd:name.safetensors:1", ("odd:name.safetensors", 1.0)),  # a colon in the name: give the strength
])
def test_lora_specs_that_parse(spec, parsed):
    assert parse_lora(spec) == parsed


@pytest.mark.parametrize("spec, message", [
    ("good.safetensors:abc", "'good.safetensors:abc': the strength must be a number, got 'abc'"),
    ("good.safetensors:", "'good.safetensors:': the strength must be a number, got ''"),
    ("good.safetensors:nan", "'good.safetensors:nan': the strength must be a finite number, got 'nan'"),
    (r"C:\x.safetensors:inf", r"the strength must be a finite number, got 'inf'"),
    (":0.5", "':0.5': no file name before the ':'"),
])
def test_lora_specs_that_are_refused(spec, message):
    with pytest.raises(ValueError) as err:
        parse_lora(spec)
    assert message in str(err.value) and "FILE[:STRENGTH]" in str(err.value)


# -- adapters are validated before any weight is read -------------------------------------------

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root, _ = cached_tiny_release(tmp_path_factory.mktemp("messages") / "cache")
    return root


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the adapters were validated")
    for name in ("load_text_encoder", "load_transformer", "load_vae"):
        monkeypatch.setattr(pipeline_mod, name, refuse)


def test_pipeline_validates_adapters_when_it_is_built(release, tmp_path, no_model_loads):
    files = ModelFiles.from_release(release)
    wrong, _ = write_tiny_lora(tmp_path / "other_model.safetensors", keys="comfy")  # 64 latent channels, not 8
    with pytest.raises(LoraError, match="LoRA other_model.safetensors does not fit this Step-Video DiT"):
        StepVideoPipeline(files, device="cpu", loras=[(wrong, 1.0)])
    good, _ = write_tiny_lora(tmp_path / "good.safetensors", config=TINY_RELEASE_DIT_CONFIG, keys="comfy")
    with pytest.raises(ValueError, match="strength of LoRA good.safetensors must be a finite number, got nan"):
        StepVideoPipeline(files, device="cpu", loras=[(good, float("nan"))])
    pipe = StepVideoPipeline(files, device="cpu", loras=[(good, 0.5)])
    assert [(e.adapter.name, e.strength) for e in pipe.adapters] == [("good.safetensors", 0.5)]


def test_pipeline_reads_each_adapter_once(release, tmp_path, monkeypatch):
    good, _ = write_tiny_lora(tmp_path / "good.safetensors", config=TINY_RELEASE_DIT_CONFIG, keys="comfy")
    reads = []
    real = adapter_mod.read_adapter
    monkeypatch.setattr(adapter_mod, "read_adapter", lambda path: reads.append(path) or real(path))
    pipe = StepVideoPipeline(ModelFiles.from_release(release), device="cpu", loras=[(good, 1.0)])
    for _ in range(2):  # the DiT is loaded and dropped twice; the adapter is read once
        pipe.generate("a cat", video=VideoRequest(cfg=1.0, steps=1, width=16, height=16, frames=17))
    assert reads == [good]


@pytest.mark.parametrize("weight_format", ["full", "fp8_scaled"])
def test_binding_to_the_meta_model_is_the_binding_to_the_loaded_model(tmp_path, weight_format):
    """Why the pipeline may bind once, before loading: only names and shapes matter, fp8 layers included."""
    folder = write_tiny_dit(tmp_path / "dit", layout="transformer")
    path, _ = write_tiny_lora(tmp_path / "style.safetensors", keys="comfy", alpha=2.0)
    meta = load_lora(path, build_transformer(dict(TINY_DIT_CONFIG), device="meta"))
    loaded = load_transformer(folder, weight_format=weight_format)
    assert weight_format == "full" or any(getattr(m, "is_fp8", False) for m in loaded.modules())
    real = load_lora(path, loaded)

    def summary(adapter):
        return [(p.target, p.kind, p.keys, p.scale) for p in adapter.patches], adapter.matched, adapter.unmatched
    assert summary(meta) == summary(real) and meta.num_blocks == real.num_blocks


# -- pickled HunyuanCLIP weights -----------------------------------------------------------------

class RunsACommand:
    """Pickles as a call of os.system: what a malicious pytorch_model.bin holds.  Pickling it only
    records the call (``__reduce__``); an unpickler that allowed it would run the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def clip_bin(tmp_path):
    """A tiny hunyuan_clip/ whose only weights are pytorch_model.bin; returns (folder, the .bin path)."""
    folder = write_tiny_hunyuan_clip(tmp_path / "hunyuan_clip", weights="bin")
    return folder, folder / "clip_text_encoder" / "pytorch_model.bin"


def test_a_bin_that_references_code_is_refused_as_such(clip_bin, tmp_path):
    folder, path = clip_bin
    marker = tmp_path / "the-command-ran"
    state = torch.load(path, weights_only=True)
    state["extra"] = RunsACommand(f"touch {marker}")
    torch.save(state, path)
    assert b"system" in path.read_bytes()  # the reference is really in the file
    with pytest.raises(CheckpointError) as err:
        load_hunyuan_clip(folder)
    message = str(err.value)
    assert not marker.exists()
    assert "references code" in message and "system" in message and "never unpickled" in message
    assert "model.safetensors" in message and "re-save" in message
    assert "weights_only=False" not in message and "truncated" not in message


def test_a_truncated_bin_is_called_truncated(clip_bin):
    folder, path = clip_bin
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_hunyuan_clip(folder)
    assert "references code" not in str(err.value)


def test_a_legacy_pickle_cut_short_is_called_truncated(clip_bin):
    folder, path = clip_bin
    state = torch.load(path, weights_only=True)
    with open(path, "wb") as handle:
        torch.save(state, handle, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hunyuan_clip(folder)


def test_a_pickle_that_is_not_a_state_dict(clip_bin):
    folder, path = clip_bin
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="is not a state dict of tensors \\(it holds a list\\)"):
        load_hunyuan_clip(folder)


# -- config.json against the weights -------------------------------------------------------------

def rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    (dict(attention_head_dim=64), ["attention_head_dim: config.json says 64, the weights have 128"]),
    (dict(attention_head_dim=64, num_layers=3, caption_channels=[96, 32]),
     ["attention_head_dim: config.json says 64, the weights have 128", "num_layers: config.json says 3, the "
      "weights have 2", "caption_channels: config.json says [96, 32], the weights have [96, 48]"]),
    (dict(num_attention_heads=4, in_channels=16), ["num_attention_heads: config.json says 4, the weights have 2",
                                                   "in_channels: config.json says 16, the weights have 64"]),
])
def test_dit_config_json_that_contradicts_the_weights(tmp_path, changes, named):
    folder = write_tiny_dit(tmp_path / "dit", layout="transformer")
    rewrite_config(folder, **changes)
    with pytest.raises(CheckpointError) as err:
        load_transformer(folder)
    message = str(err.value)
    assert f"{folder / 'config.json'} does not match the weights" in message
    for text in named:
        assert text in message, message
    assert message.count("config.json says") == len(named) and "must be" not in message


def test_dit_weights_that_are_invalid_themselves_are_still_refused(tmp_path):
    """config.json and the weights agree (4 heads of 64), but no Step-Video DiT has that head size: the
    config's own check names it.  (use_additional_conditions is decided by the weights, see
    tests/core/dit/test_ti2v_loader.py, so it no longer makes such a case.)"""
    from safetensors.torch import load_file, save_file

    folder = write_tiny_dit(tmp_path / "dit", layout="transformer")
    for shard in folder.glob("*.safetensors"):
        state = load_file(str(shard))
        for name in [k for k in state if k.endswith(("q_norm.weight", "k_norm.weight"))]:
            state[name] = state[name][:64].clone()
        save_file(state, str(shard))
    rewrite_config(folder, num_attention_heads=4, attention_head_dim=64)
    with pytest.raises(CheckpointError, match=r"attention_head_dim must be 128 \(the 3D RoPE split"):
        load_transformer(folder)


@pytest.fixture(scope="module")
def step_llm(tmp_path_factory):
    return write_tiny_step_llm(tmp_path_factory.mktemp("llm") / "step_llm", tokenizer=False)


@pytest.mark.parametrize("changes, named, never", [
    (dict(hidden_size=128), ["hidden_size: config.json says 128, the weights have 96"],
     ["num_attention_groups", "1.5"]),
    (dict(hidden_size=100), ["hidden_size: config.json says 100, the weights have 96"], ["divisible"]),
    (dict(hidden_size=128, num_layers=3, padded_vocab_size=1024),
     ["hidden_size: config.json says 128, the weights have 96", "num_layers: config.json says 3, the weights have 2",
      "padded_vocab_size: config.json says 1024, the weights have 512"], ["num_attention_groups"]),
    (dict(num_attention_heads=3), ["num_attention_groups / num_attention_heads: config.json says 2 groups for 3 "
                                   "heads, the weights imply groups/heads = 1/2"], ["1.5", "divisible"]),
    (dict(num_attention_heads=8), ["num_attention_groups: config.json says 2, the weights have 4 with "
                                   "num_attention_heads 8"], []),
])
def test_step_llm_config_json_that_contradicts_the_weights(step_llm, tmp_path, changes, named, never):
    folder = tmp_path / "step_llm"
    shutil.copytree(step_llm, folder)
    rewrite_config(folder, **changes)
    with pytest.raises(CheckpointError) as err:
        load_step_llm(folder)
    message = str(err.value)
    assert f"{folder / 'config.json'} does not match the weights" in message
    for text in named:
        assert text in message, message
    for text in never:
        assert text not in message, message
    assert message.count("config.json says") == len(named)
