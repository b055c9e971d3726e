"""Text-encoder nodes end to end on tiny models, without ComfyUI."""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch

from tests.factory import write_tiny_hunyuan_clip, write_tiny_step_llm, write_tiny_text_encoders

PROMPT = "A panda 在竹林里 eating bamboo."


@pytest.fixture
def text_mod(pack, bridge):
    """The pack's nodes.text module (ComfyUI forced absent by the `bridge` fixture)."""
    return sys.modules[f"{pack.__name__}.nodes.text"]


@pytest.fixture
def root(models_dir):
    """A tiny release root under models/text_encoders."""
    write_tiny_text_encoders(models_dir / "text_encoders" / "stepvideo-t2v-tiny")
    return "stepvideo-t2v-tiny"


def load(text_mod, step_llm, hunyuan_clip, **kwargs):
    options = dict(weight_dtype="fp32", alibi=True, device_plan="auto")
    options.update(kwargs)
    out = text_mod.StepVideoTextEncoderLoader().load(step_llm=step_llm, hunyuan_clip=hunyuan_clip, **options)
    (encoder,) = out["result"]
    return encoder, out["ui"]["text"][0]


def test_nodes_are_registered(pack):
    for node in ("StepVideoTextEncoderLoader", "StepVideoTextEncode", "StepVideoNegativeTextEncode"):
        assert node in pack.NODE_CLASS_MAPPINGS and node in pack.NODE_DISPLAY_NAME_MAPPINGS


def test_listing_roots_and_component_folders(text_mod, models_dir, root):
    te = models_dir / "text_encoders"
    write_tiny_step_llm(te / "split" / "step_llm")
    write_tiny_hunyuan_clip(te / "split" / "hunyuan_clip")
    write_tiny_step_llm(te / "llm-only")
    required = text_mod.StepVideoTextEncoderLoader.INPUT_TYPES()["required"]
    assert required["step_llm"][0] == ["llm-only", "split", root]
    assert required["hunyuan_clip"][0] == ["split", root]
    assert required["device_plan"][0] == ["auto", "resident", "stream", "cpu"]
    assert required["alibi"][1]["default"] is True


def test_empty_folder_shows_a_hint(text_mod, models_dir):
    options = text_mod.StepVideoTextEncoderLoader.INPUT_TYPES()["required"]["step_llm"][0]
    assert options == ["(no step_llm folder in models/text_encoders)"]


def test_loader_encode_and_negative_end_to_end(text_mod, root):
    encoder, summary = load(text_mod, root, root)
    assert "Step-LLM: 2 layers, width 96" in summary and "sqrt-ALiBi" in summary and "loaded in" in summary
    assert encoder.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")

    out = text_mod.StepVideoTextEncode().encode(text_encoder=encoder, prompt=PROMPT, add_magic=True)
    (cond,) = out["result"]
    assert cond.prompt == text_mod.with_magic(PROMPT)
    assert cond.encoder_hidden_states.shape == (1, 320, 96)
    assert cond.encoder_hidden_states_2.shape == (1, 77, 48)
    assert cond.encoder_attention_mask.shape == (1, 397)
    assert set(cond.dit_inputs()) == {"encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask"}
    assert "Step-LLM tokens:" in out["ui"]["text"][0]

    plain = text_mod.StepVideoTextEncode().encode(text_encoder=encoder, prompt=PROMPT, add_magic=False)["result"][0]
    assert plain.prompt == PROMPT
    assert plain.encoder_attention_mask.sum() < cond.encoder_attention_mask.sum()

    inputs = text_mod.StepVideoNegativeTextEncode.INPUT_TYPES()["required"]
    assert inputs["prompt"][1]["default"] == text_mod.NEGATIVE_PROMPT
    neg = text_mod.StepVideoNegativeTextEncode().encode(text_encoder=encoder, prompt=text_mod.NEGATIVE_PROMPT)
    assert neg["result"][0].prompt == text_mod.NEGATIVE_PROMPT

    again = text_mod.StepVideoTextEncode().encode(text_encoder=encoder, prompt=PROMPT, add_magic=True)
    assert "from cache" in again["ui"]["text"][0]
    assert torch.equal(again["result"][0].encoder_hidden_states, cond.encoder_hidden_states)


def test_split_folders_bf16_and_no_alibi(text_mod, models_dir):
    te = models_dir / "text_encoders"
    write_tiny_step_llm(te / "step_llm")
    write_tiny_hunyuan_clip(te / "hunyuan_clip")
    encoder, summary = load(text_mod, "step_llm", "hunyuan_clip", weight_dtype="default", alibi=False,
                            device_plan="stream")
    assert encoder.dtype == torch.bfloat16 and not encoder.alibi and encoder.plan == "stream"
    assert "plain causal" in summary
    cond = text_mod.StepVideoTextEncode().encode(text_encoder=encoder, prompt="cat", add_magic=False)["result"][0]
    assert cond.encoder_hidden_states.dtype == torch.bfloat16


def test_truncation_warning_is_shown_on_the_node(text_mod, root):
    encoder, _ = load(text_mod, root, root)
    long = "A cat walks along the beach at sunset, waves rolling in slowly. " * 40
    out = text_mod.StepVideoTextEncode().encode(text_encoder=encoder, prompt=long, add_magic=False)
    text = out["ui"]["text"][0]
    assert "WARNING: Step-LLM: prompt 1 is" in text and "dropped" in text
    assert out["result"][0].notes and "Step-LLM tokens: 320 of 320" in text


def test_interrupt_stops_encoding(text_mod, bridge, root):
    encoder, _ = load(text_mod, root, root)
    bridge.request_interrupt(True)
    with pytest.raises(bridge.StepVideoInterrupted):
        text_mod.StepVideoTextEncode().encode(text_encoder=encoder, prompt="a new prompt", add_magic=False)
    assert not encoder.is_cached("a new prompt")


def test_is_changed_fingerprints_files(text_mod, models_dir, root):
    node = text_mod.StepVideoTextEncoderLoader
    first = node.IS_CHANGED(root, root, "fp32", True, "auto")
    assert isinstance(first, str) and "model-00001-of-00002.safetensors" in first
    config = models_dir / "text_encoders" / root / "step_llm" / "config.json"
    os.utime(config, ns=(1, 1))
    assert node.IS_CHANGED(root, root, "fp32", True, "auto") != first
    assert math.isnan(node.IS_CHANGED("missing", root, "fp32", True, "auto"))


def test_wrong_input_and_dtype_are_refused(text_mod, root):
    with pytest.raises(TypeError, match="StepVideoTextEncoderLoader"):
        text_mod.StepVideoTextEncode().encode(text_encoder="not an encoder", prompt="x", add_magic=True)
    with pytest.raises(ValueError, match="weight_dtype"):
        load(text_mod, root, root, weight_dtype="fp8")


def test_free_vram_bridge(bridge, monkeypatch):
    assert bridge.free_vram(torch.device("cpu")) is None
    fake = types.SimpleNamespace(get_free_memory=lambda device: 123 << 20)
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", fake)
    assert bridge.free_vram(torch.device("cuda:0")) == 123 << 20
