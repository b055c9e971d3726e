"""Conditioning from both encoders: shapes, mask layout, prompt conventions, cache, refusals, DiT fit."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from stepvideo_core import (NEGATIVE_PROMPT, POSITIVE_MAGIC, CheckpointError, build_transformer, load_step_llm,
                            load_text_encoder, with_magic)
from stepvideo_core.text import StepVideoTextEncoder
from stepvideo_core.text.clip import load_hunyuan_clip
from stepvideo_core.text.tokenizer import StepTokenizer
from tests.factory import TINY_DIT_CONFIG, tiny_dit_state_dict, write_tiny_hunyuan_clip, write_tiny_step_llm

EN, ZH, MIXED = ("A cat walks along the beach at sunset.", "一只猫在日落时分沿着海滩散步。",
                 "A panda 在竹林里 eating bamboo, 高清.")
LONG = "A cat walks along the beach at sunset, waves rolling in slowly. " * 40


def fresh(release_root, **kwargs):
    """A private encoder (own cache) on the shared tiny files."""
    kwargs.setdefault("dtype", torch.float32)
    return load_text_encoder(release_root, device="cpu", **kwargs)


def test_shapes_dtypes_and_mask_layout(encoder):
    out = encoder.encode([EN, ZH, MIXED])
    assert list(out) == ["encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask"]
    assert out["encoder_hidden_states"].shape == (3, 320, 96)
    assert out["encoder_hidden_states_2"].shape == (3, 77, 48)
    assert out["encoder_attention_mask"].shape == (3, 397) and out["encoder_attention_mask"].dtype == torch.long
    assert all(v.device.type == "cpu" for v in out.values())
    tokens = encoder.tokenizer([EN, ZH, MIXED])
    mask = out["encoder_attention_mask"]
    assert (mask[:, :77] == 1).all()
    assert torch.equal(mask[:, 77:], tokens.attention_mask)


def test_parts_equal_the_two_models_called_directly(release_root, encoder):
    out = encoder.encode([EN, MIXED])
    llm = load_step_llm(release_root, dtype=torch.float32)
    tokens = encoder.tokenizer([EN, MIXED])
    with torch.no_grad():
        assert torch.equal(out["encoder_hidden_states"], llm(tokens.input_ids))
    assert torch.equal(out["encoder_hidden_states_2"], load_hunyuan_clip(release_root).encode([EN, MIXED]))


def reference_conditioning(encoder, prompts):
    """What :meth:`encode` must return, computed another way: the Step-LLM's plain ``forward`` and CLIP's own
    ``encode`` on deep copies of the encoder's models (no device plan, no ``functional_call``), the mask
    built by hand (77 CLIP ones, then the Step-LLM mask)."""
    llm, clip = copy.deepcopy(encoder.llm), copy.deepcopy(encoder.clip)
    tokens = encoder.tokenizer(prompts)
    with torch.no_grad():
        hidden = llm(tokens.input_ids)
    clip_out = clip.encode(prompts)
    assert clip_out.dtype == torch.float32  # CLIP computes in fp32 whatever the Step-LLM's dtype
    ones = torch.ones(len(prompts), 77, dtype=torch.long)
    return {"encoder_hidden_states": hidden, "encoder_hidden_states_2": clip_out.to(encoder.dtype),
            "encoder_attention_mask": torch.cat([ones, tokens.attention_mask], dim=1)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_every_device_plan_equals_the_plain_models(release_root, dtype):
    """Every device plan gives the conditioning computed without any plan (bit for bit: on one CPU the same
    operations run), and so the plans agree with each other; both embeddings come out in the Step-LLM's dtype."""
    enc = fresh(release_root, dtype=dtype)
    out = enc.encode([ZH, EN])
    assert out["encoder_hidden_states"].dtype == out["encoder_hidden_states_2"].dtype == dtype
    assert enc.last_plan == "cpu"  # auto on a CPU device
    expected = reference_conditioning(enc, [ZH, EN])
    plans = {"auto": out}
    for name in ("cpu", "stream", "resident"):
        planned = fresh(release_root, dtype=dtype, plan=name)
        plans[name] = planned.encode_uncached([ZH, EN])
        assert planned.last_plan == name
    for name, got in plans.items():
        assert list(got) == list(expected), name
        for key in expected:
            assert got[key].dtype == expected[key].dtype, (name, key, got[key].dtype)
            diff = (got[key].double() - expected[key].double()).abs().max().item()
            assert torch.equal(got[key], expected[key]), f"plan {name}: {key} differs by up to {diff:.3g}"
    for key in expected:  # the plans agree with each other
        assert torch.equal(plans["stream"][key], plans["resident"][key])
        assert torch.equal(plans["stream"][key], plans["cpu"][key])


def test_rows_do_not_depend_on_the_batch(release_root):
    enc = fresh(release_root)
    batch = enc.encode_uncached([EN, ZH, MIXED])
    alone = enc.encode_uncached([ZH])
    for key in batch:
        torch.testing.assert_close(batch[key][1:2], alone[key], rtol=1e-5, atol=1e-5)


def test_magic_suffix_on_and_off(encoder):
    assert with_magic(ZH) == ZH + POSITIVE_MAGIC and with_magic(ZH, add_magic=False) == ZH
    assert POSITIVE_MAGIC.startswith("超高清、HDR 视频") and NEGATIVE_PROMPT.startswith("画面暗、低分辨率")
    plain, magic = encoder.encode([ZH, with_magic(ZH)])["encoder_attention_mask"].sum(dim=1).tolist()
    assert magic > plain
    # causal attention: the prompt's own positions do not see the suffix that follows
    out = encoder.encode([ZH, with_magic(ZH)])["encoder_hidden_states"]
    n = plain - 77 - 1  # BOS + prompt pieces
    torch.testing.assert_close(out[0, :n], out[1, :n], rtol=1e-5, atol=1e-5)


def test_empty_list_is_one_bos_eos_row(encoder):
    out = encoder.encode([])
    assert out["encoder_hidden_states"].shape[0] == 1
    assert out["encoder_attention_mask"][0].sum() == 77 + 2
    assert torch.equal(out["encoder_hidden_states"], encoder.encode([""])["encoder_hidden_states"])


def test_cache_answers_repeats_and_is_keyed(release_root, monkeypatch):
    enc = fresh(release_root, cache_size=2)
    first = enc.encode([EN, EN])  # a duplicate in one batch is encoded once
    assert torch.equal(first["encoder_hidden_states"][0], first["encoder_hidden_states"][1])
    calls = []
    original = enc.encode_uncached
    monkeypatch.setattr(enc, "encode_uncached", lambda p, cb=None: calls.append(list(p)) or original(p, cb))
    again = enc.encode([EN])
    assert calls == [] and enc.is_cached(EN)
    assert torch.equal(again["encoder_hidden_states"][0], first["encoder_hidden_states"][0])
    enc.encode([ZH, MIXED])  # LRU of 2: EN is evicted
    assert calls == [[ZH, MIXED]] and not enc.is_cached(EN)
    key = enc.cache_key(ZH)
    assert key[0] == enc.identity and key[1] == ZH and key[2] is True and "float32" in key[3]
    assert str(release_root / "step_llm") in enc.identity and "model-00001-of-00002.safetensors" in enc.identity
    enc.alibi = False
    assert not enc.is_cached(ZH)  # a different setting is a different entry
    enc.clear_cache()
    assert not enc._cache


def test_truncation_is_logged_and_reported(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="StepVideo"):
        out = encoder.encode([LONG])
    assert out["encoder_attention_mask"][0].sum() == 397
    assert "prompt 1 is" in caplog.text and "dropped" in caplog.text
    notes = encoder.notes(LONG)
    assert any(n.startswith("Step-LLM: prompt 1") for n in notes)
    assert any(n.startswith("HunyuanCLIP: prompt 1") for n in notes)
    assert encoder.notes(EN) == []


def test_progress_callback(release_root):
    seen = []
    fresh(release_root).encode([EN], callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_conditioning_drives_the_tiny_dit(encoder):
    dit = build_transformer(TINY_DIT_CONFIG, device="cpu", dtype=torch.float32)
    dit.load_state_dict(tiny_dit_state_dict())
    cond = encoder.encode([with_magic(MIXED), NEGATIVE_PROMPT])
    with torch.no_grad():
        velocity = dit(torch.randn(2, 2, 64, 4, 4), torch.tensor([0.0, 0.5]), **cond)
    assert velocity.shape == (2, 2, 64, 4, 4) and torch.isfinite(velocity).all()


# ----------------------------------------------------------------------------- refusals

def test_missing_tokenizer_is_named(release_root, copy_tree):
    root = copy_tree(release_root)
    (root / "step_llm" / "step1_chat_tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="step1_chat_tokenizer.model is missing"):
        load_text_encoder(root)


def test_dit_folder_as_step_llm(tmp_path, release_root):
    from tests.factory import write_tiny_dit
    dit = write_tiny_dit(tmp_path / "dit", layout="transformer")
    (dit / "step1_chat_tokenizer.model").write_bytes(
        (release_root / "step_llm" / "step1_chat_tokenizer.model").read_bytes())
    with pytest.raises(CheckpointError, match="Step-Video DiT"):
        load_text_encoder(dit, release_root / "hunyuan_clip")


def test_missing_clip_folder_and_bad_plan(tmp_path, release_root):
    llm_dir = write_tiny_step_llm(tmp_path / "alone" / "step_llm")
    with pytest.raises(CheckpointError, match="no hunyuan_clip/ folder"):
        load_text_encoder(llm_dir)
    with pytest.raises(ValueError, match="plan must be"):
        load_text_encoder(release_root, plan="gpu")


def test_tokenizer_larger_than_the_embedding_table(tmp_path):
    llm_dir = write_tiny_step_llm(tmp_path / "step_llm", config=dict(
        hidden_size=96, num_layers=1, num_attention_heads=4, num_attention_groups=2, ffn_hidden_size=160,
        padded_vocab_size=256))
    write_tiny_hunyuan_clip(tmp_path / "hunyuan_clip")
    with pytest.raises(CheckpointError, match="500 pieces but .* only 256 embeddings"):
        load_text_encoder(llm_dir)
    llm = load_step_llm(llm_dir, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="500 pieces"):
        StepVideoTextEncoder(llm, StepTokenizer(llm_dir / "step1_chat_tokenizer.model"),
                             load_hunyuan_clip(tmp_path / "hunyuan_clip"))
