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


# ----------------------------------------------------------------------------- memory


def test_loader_returns_a_handle_without_comfyui_management(text_mod, types_mod, root):
    handle, summary = load(text_mod, root, root)
    assert isinstance(handle, types_mod.StepVideoTextEncoderHandle)
    assert handle.patcher is None and handle.keep_in_ram is True and "ComfyUI-managed" not in summary
    assert handle.device == handle.encoder.device and handle.plan == "auto"  # read through to the encoder
    bare = text_mod.StepVideoTextEncode().encode(text_encoder=handle.encoder, prompt="cat", add_magic=False)
    assert bare["result"][0].encoder_hidden_states.shape == (1, 320, 96)  # a bare core encoder still works


def released(encoder) -> bool:
    tensors = [*encoder.llm.parameters(), *encoder.clip.parameters()]
    return all(t.is_meta for t in tensors)


def test_memory_node_releases_after_each_encode_and_the_cache_still_answers(text_mod, root):
    handle, _ = load(text_mod, root, root)
    encoder = handle.encoder
    reference = text_mod.StepVideoTextEncode().encode(text_encoder=handle, prompt="a dog", add_magic=False)
    assert not released(encoder)  # keep_in_ram (the default): the weights stay
    memory = text_mod.StepVideoTextEncoderMemory
    assert memory.INPUT_TYPES()["required"]["keep_in_ram"][1]["default"] is False
    out = memory().apply(text_encoder=handle, keep_in_ram=False)
    low = out["result"][0]
    assert low.encoder is encoder and low.keep_in_ram is False and handle.keep_in_ram is True
    assert "dropped after each encode" in out["ui"]["text"][0]

    first = text_mod.StepVideoTextEncode().encode(text_encoder=low, prompt=PROMPT, add_magic=False)
    assert released(encoder) and encoder.weights_released and "weights released" in first["ui"]["text"][0]
    again = text_mod.StepVideoTextEncode().encode(text_encoder=low, prompt=PROMPT, add_magic=False)
    text = again["ui"]["text"][0]
    assert "from cache" in text and "read again" not in text and released(encoder)
    assert torch.equal(again["result"][0].encoder_hidden_states, first["result"][0].encoder_hidden_states)

    encoder.clear_cache()  # "a dog" is no longer cached: the weights are read again, then dropped again
    fresh = text_mod.StepVideoTextEncode().encode(text_encoder=low, prompt="a dog", add_magic=False)
    assert "read again from disk" in fresh["ui"]["text"][0] and released(encoder)
    for key, value in reference["result"][0].dit_inputs().items():
        assert torch.equal(fresh["result"][0].dit_inputs()[key], value), key  # the same files: bit for bit

    kept = memory().apply(text_encoder=low, keep_in_ram=True)["result"][0]
    text_mod.StepVideoTextEncode().encode(text_encoder=kept, prompt="a fox", add_magic=False)
    assert not released(encoder) and "kept in RAM" in memory().apply(kept, True)["ui"]["text"][0]


def test_an_encoder_that_cannot_reread_its_weights_is_not_released(text_mod, root):
    handle, _ = load(text_mod, root, root)
    enc = handle.encoder
    bare = text_mod.StepVideoTextEncoder(enc.llm, enc.tokenizer, enc.clip, device="cpu")  # built from modules
    with pytest.raises(ValueError, match="cannot read its weights again"):
        text_mod.StepVideoTextEncoderMemory().apply(text_encoder=bare, keep_in_ram=False)
    kept = text_mod.StepVideoTextEncoderMemory().apply(text_encoder=bare, keep_in_ram=True)["result"][0]
    assert kept.encoder is bare and not released(enc)


def test_keep_in_ram_off_releases_also_after_an_interrupted_encode(text_mod, bridge, root):
    handle, _ = load(text_mod, root, root)
    low = text_mod.StepVideoTextEncoderMemory().apply(text_encoder=handle, keep_in_ram=False)["result"][0]
    bridge.request_interrupt(True)
    with pytest.raises(bridge.StepVideoInterrupted):
        text_mod.StepVideoTextEncode().encode(text_encoder=low, prompt="stopped", add_magic=False)
    assert released(handle.encoder) and not handle.encoder.is_cached("stopped")


def test_streaming_room_is_freed_before_a_gpu_encode(text_mod, bridge, root, monkeypatch):
    """Outside ComfyUI an encode on an accelerator frees one layer's streaming room first (nothing else moves)."""
    handle, _ = load(text_mod, root, root)
    freed = []
    monkeypatch.setattr(bridge, "free_memory", lambda need=None, device=None: freed.append((need, device)))
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(handle.encoder, "device", torch.device("cpu"))
    text_mod.place_weights(handle)
    assert freed == []  # a CPU encode needs no VRAM
    monkeypatch.setattr(handle.encoder, "device", cuda)
    text_mod.place_weights(handle)
    assert freed[-1] == (text_mod.stream_bytes(handle.encoder.llm, 1, text_mod.MAX_LENGTH), cuda)


@pytest.mark.usefixtures("one_thread")
def test_release_gives_the_weights_back_to_the_system(text_mod, models_dir):
    """RSS with a mid-size Step-LLM (6 x 1024, 0.27 GiB in fp32), outside ComfyUI: an encode with keep_in_ram
    off leaves about the weights' size less resident; a cached prompt reads nothing back."""
    import gc

    psutil = pytest.importorskip("psutil")
    te = models_dir / "text_encoders" / "mid"
    write_tiny_step_llm(te / "step_llm", config=dict(hidden_size=1024, num_layers=6, num_attention_heads=8,
                                                     num_attention_groups=2, ffn_hidden_size=2816,
                                                     padded_vocab_size=4096))
    write_tiny_hunyuan_clip(te / "hunyuan_clip")
    handle, _ = load(text_mod, "mid", "mid")
    weights = handle.encoder.weight_bytes()
    low = text_mod.StepVideoTextEncoderMemory().apply(text_encoder=handle, keep_in_ram=False)["result"][0]
    gc.collect()
    loaded = psutil.Process().memory_info().rss
    text_mod.StepVideoTextEncode().encode(text_encoder=low, prompt=PROMPT, add_magic=False)
    gc.collect()
    after = psutil.Process().memory_info().rss
    assert loaded - after > 0.8 * weights, (loaded - after, weights)
    again = text_mod.StepVideoTextEncode().encode(text_encoder=low, prompt=PROMPT, add_magic=False)
    assert "from cache" in again["ui"]["text"][0] and psutil.Process().memory_info().rss - after < 0.1 * weights


@pytest.mark.parametrize("plan, load_on_gpu, loads", [
    ("resident", True, [("working", True)]),   # every weight on the GPU, plus the activations
    ("auto", True, [("streaming", False)]),    # what fits; one layer's streaming room kept free
    ("stream", False, [(0, False)]),           # accounted in RAM where it rests; room for one layer freed
    ("cpu", False, [(0, False)]),
])
def test_inside_comfyui_the_plan_decides_what_comfyui_loads(text_mod, types_mod, bridge, root, monkeypatch, plan,
                                                            load_on_gpu, loads):
    handle, _ = load(text_mod, root, root, device_plan=plan)
    encoder, cuda, cpu = handle.encoder, torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(encoder, "device", cuda)
    assert text_mod.patcher_load_device(encoder, cpu) == (cuda if load_on_gpu else cpu)
    patcher = types.SimpleNamespace(load_device=text_mod.patcher_load_device(encoder, cpu))
    managed = types_mod.StepVideoTextEncoderHandle(encoder=encoder, patcher=patcher)
    calls, freed = [], []
    monkeypatch.setattr(bridge, "load_models", lambda p, memory_required=0, full=False:
                        calls.append((p, memory_required, full)))
    monkeypatch.setattr(bridge, "free_memory", lambda need=None, device=None: freed.append((need, device)))
    text_mod.place_weights(managed)
    sizes = {"working": text_mod.activation_bytes(encoder.llm.config, 1, text_mod.MAX_LENGTH, encoder.dtype)
             + text_mod.DEFAULT_HEADROOM, "streaming": text_mod.stream_bytes(encoder.llm, 1, text_mod.MAX_LENGTH)}
    assert calls == [([patcher], sizes.get(need, need), full) for need, full in loads]
    assert freed == ([(sizes["streaming"], cuda)] if plan == "stream" else [])
