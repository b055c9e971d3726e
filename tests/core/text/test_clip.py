"""HunyuanCLIP wrapper vs transformers called directly; safetensors and pickle paths; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertModel, BertTokenizer

from stepvideo_core import CheckpointError
from stepvideo_core.text.clip import clip_weight_file, load_hunyuan_clip
from tests.factory import write_tiny_hunyuan_clip

PROMPTS = ["A cat walks along the beach at sunset.", "一只猫在日落时分沿着海滩散步。", "A panda 在竹林里 eating bamboo."]


class NotATensor:
    """Pickled by reference: a weights_only load must refuse it."""


def transformers_reference(folder, prompts):
    """What the official wrapper computes, with transformers alone."""
    tokenizer = BertTokenizer.from_pretrained(folder / "tokenizer")
    model = BertModel.from_pretrained(folder / "clip_text_encoder").eval()
    batch = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {kind: write_tiny_hunyuan_clip(root / kind / "hunyuan_clip", weights=kind)
            for kind in ("safetensors", "bin", "both")}


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_wrapper_equals_transformers(clip_dirs, kind):
    clip = load_hunyuan_clip(clip_dirs[kind])
    out = clip.encode(PROMPTS)
    assert out.shape == (3, 77, 48) and out.dtype == torch.float32
    assert torch.equal(out, transformers_reference(clip_dirs[kind], PROMPTS))


def test_pickle_and_safetensors_give_the_same_model(clip_dirs):
    a = load_hunyuan_clip(clip_dirs["safetensors"]).encode(PROMPTS)
    b = load_hunyuan_clip(clip_dirs["bin"]).encode(PROMPTS)
    assert torch.equal(a, b)


def test_safetensors_preferred_when_both_present(clip_dirs):
    encoder_dir = clip_dirs["both"] / "clip_text_encoder"
    assert clip_weight_file(encoder_dir).name == "model.safetensors"
    assert clip_weight_file(clip_dirs["bin"] / "clip_text_encoder").name == "pytorch_model.bin"


def test_release_root_is_accepted(clip_dirs):
    assert load_hunyuan_clip(clip_dirs["safetensors"].parent).encode(["x"]).shape == (1, 77, 48)


def test_tokenizer_pads_and_truncates_to_77(clip_dirs):
    clip = load_hunyuan_clip(clip_dirs["safetensors"])
    ids, mask = clip.tokenize(["cat", "一只猫在日落时分沿着海滩散步。" * 10])
    assert ids.shape == mask.shape == (2, 77)
    assert mask[0].sum() == 3 and mask[1].sum() == 77  # [CLS] cat [SEP]; the long one is cut
    assert clip.token_count("一只猫在日落时分沿着海滩散步。" * 10) == 152


def test_pickle_with_objects_is_refused(tmp_path):
    folder = write_tiny_hunyuan_clip(tmp_path / "hunyuan_clip", weights="bin")
    state = torch.load(folder / "clip_text_encoder" / "pytorch_model.bin", weights_only=True)
    state["extra"] = NotATensor()
    torch.save(state, folder / "clip_text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_hunyuan_clip(folder)


def test_config_that_does_not_fit_the_weights(tmp_path):
    folder = write_tiny_hunyuan_clip(tmp_path / "hunyuan_clip")
    config_path = folder / "clip_text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing \(e.g. \['encoder.layer.2"):
        load_hunyuan_clip(folder)


def test_missing_parts_are_named(tmp_path):
    folder = write_tiny_hunyuan_clip(tmp_path / "hunyuan_clip")
    (folder / "clip_text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors or pytorch_model.bin"):
        load_hunyuan_clip(folder)
    (folder / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="vocab.txt"):
        load_hunyuan_clip(folder)
    with pytest.raises(CheckpointError, match="not a HunyuanCLIP folder"):
        load_hunyuan_clip(folder / "tokenizer")
