"""StepVideoModelLoader on tiny checkpoints in the official layouts, without ComfyUI."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch

from tests.factory import TINY_DIT_CONFIG, write_tiny_dit


@pytest.fixture
def model_mod(pack, bridge):
    """The pack's nodes.model module (ComfyUI forced absent by the `bridge` fixture)."""
    return sys.modules[f"{pack.__name__}.nodes.model"]


@pytest.fixture
def dit_dir(models_dir):
    return models_dir / "diffusion_models"


@pytest.fixture
def official(dit_dir):
    """A tiny official `stepvideo-t2v/` root (with transformer/ shards) under diffusion_models."""
    write_tiny_dit(dit_dir / "stepvideo-t2v-tiny", layout="official")
    return "stepvideo-t2v-tiny"


def run_loader(model_mod, model, weight_dtype="fp32", attention="sdpa"):
    out = model_mod.StepVideoModelLoader().load(model=model, weight_dtype=weight_dtype, attention=attention)
    assert set(out) == {"ui", "result"}
    (handle,) = out["result"]
    return handle, out["ui"]


def test_official_root_is_offered_and_loads(model_mod, official):
    options = model_mod.StepVideoModelLoader.INPUT_TYPES()["required"]["model"][0]
    assert options == [official]

    handle, ui = run_loader(model_mod, official)
    assert isinstance(handle, model_mod.StepVideoModelHandle)
    cfg = handle.transformer.config
    assert cfg.num_layers == TINY_DIT_CONFIG["num_layers"]
    assert cfg.num_attention_heads == TINY_DIT_CONFIG["num_attention_heads"]
    assert handle.config is cfg
    assert handle.dtype == torch.float32
    assert handle.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert handle.offload_device == torch.device("cpu")
    assert handle.attention == "sdpa" and handle.transformer.attention_backend == "sdpa"
    assert handle.adapters == ()
    assert handle.source.is_absolute() and handle.source.name == official
    params = list(handle.transformer.parameters())
    assert params and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    assert not any(p.requires_grad for p in params) and not handle.transformer.training

    (text,) = ui["text"]
    width = cfg.num_attention_heads * cfg.attention_head_dim
    assert f"{cfg.num_layers} layers, width {width}" in text
    assert "float32" in text and "attention sdpa" in text and "loaded in" in text
    assert model_mod.format_count(handle.transformer.num_parameters()) in text


def test_handle_is_light_and_shares_weights(model_mod, official):
    handle, _ = run_loader(model_mod, official)
    with pytest.raises(dataclasses.FrozenInstanceError):
        handle.attention = "auto"
    other = dataclasses.replace(handle, adapters=("lora",))
    assert other.transformer is handle.transformer and handle.adapters == ()


def test_transformer_subfolder_and_single_file_load_too(model_mod, dit_dir, official):
    single = write_tiny_dit(dit_dir / "singles", layout="single")
    single_name = single.relative_to(dit_dir).as_posix()
    handle_sub, _ = run_loader(model_mod, f"{official}/transformer")
    handle_one, _ = run_loader(model_mod, single_name)
    for handle in (handle_sub, handle_one):
        assert handle.transformer.config.num_layers == TINY_DIT_CONFIG["num_layers"]
    assert set(model_mod.StepVideoModelLoader.INPUT_TYPES()["required"]["model"][0]) == {official, single_name}


@pytest.mark.parametrize("choice, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_weight_dtype_choices(model_mod, official, choice, dtype):
    handle, _ = run_loader(model_mod, official, weight_dtype=choice)
    assert handle.dtype == dtype
    assert {p.dtype for p in handle.transformer.parameters()} == {dtype}


def test_default_dtype_depends_on_device(model_mod):
    assert model_mod.resolve_weight_dtype("default", torch.device("cpu")) == torch.float32
    assert model_mod.resolve_weight_dtype("default", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="weight_dtype"):
        model_mod.resolve_weight_dtype("fp8", torch.device("cpu"))


def test_input_types_offer_dtypes_and_backends(model_mod):
    from importlib import import_module

    attention = import_module(model_mod.__name__.rsplit(".", 2)[0] + ".stepvideo_core.attention")
    required = model_mod.StepVideoModelLoader.INPUT_TYPES()["required"]
    assert required["weight_dtype"][0] == ["auto", "default", "bf16", "fp16", "fp32", "fp8_scaled"]
    assert required["attention"][0] == list(attention.BACKENDS)
    assert required["attention"][1]["default"] in attention.available_backends()


def test_unusable_attention_backend_fails_before_loading(model_mod, official, monkeypatch):
    calls = []
    monkeypatch.setattr(model_mod, "load_transformer", lambda *a, **k: calls.append(a))
    with pytest.raises(RuntimeError, match="sageattention"):
        run_loader(model_mod, official, attention="sageattention")  # CPU here: never usable
    assert calls == []


def test_missing_entry_has_a_clear_error(model_mod, models_dir):
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        run_loader(model_mod, "gone.safetensors")


def test_is_changed_tracks_checkpoint_files(model_mod, dit_dir, official):
    node = model_mod.StepVideoModelLoader
    first = node.IS_CHANGED(model=official, weight_dtype="fp32", attention="sdpa")
    assert first == node.IS_CHANGED(model=official, weight_dtype="fp32", attention="sdpa")
    shard = sorted((dit_dir / official / "transformer").glob("*.safetensors"))[0]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert node.IS_CHANGED(model=official, weight_dtype="fp32", attention="sdpa") != first
    missing = node.IS_CHANGED(model="gone.safetensors", weight_dtype="fp32", attention="sdpa")
    assert isinstance(missing, float) and math.isnan(missing)


def test_checkpoint_files_of_each_layout(model_mod, dit_dir, official):
    root = dit_dir / official
    files = model_mod.checkpoint_files(root)
    assert files == model_mod.checkpoint_files(root / "transformer")
    names = {p.name for p in files}
    assert "config.json" in names and any(n.endswith(".index.json") for n in names)
    assert sum(n.endswith(".safetensors") for n in names) >= 1
    single = write_tiny_dit(dit_dir / "s", layout="single")
    assert model_mod.checkpoint_files(single) == [single]


@pytest.mark.parametrize("n, text", [(12, "12"), (1_500, "1.5K"), (4_200_000, "4.2M"), (30_100_000_000, "30.1B")])
def test_format_count(model_mod, n, text):
    assert model_mod.format_count(n) == text
