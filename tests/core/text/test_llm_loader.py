"""load_step_llm on tiny folders in the release layout, and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import CheckpointError, build_step_llm, load_step_llm
from stepvideo_core.text.llm_loader import INDEX_NAME
from tests.factory import TINY_LLM_CONFIG, tiny_step_llm_state_dict, write_tiny_dit, write_tiny_step_llm

IDS = torch.tensor([[1, 17, 250, 33, 2, 2, 2], [1, 400, 2, 2, 2, 2, 2]])


def reference(alibi=True, seed=0):
    """The same weights pushed straight into a model (bf16 on disk -> fp32), no loader involved."""
    model = build_step_llm(TINY_LLM_CONFIG, device="cpu", dtype=torch.float32, alibi=alibi)
    state = tiny_step_llm_state_dict(seed=seed, dtype=torch.bfloat16)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def test_loads_the_release_layout_through_the_real_loader(release_root):
    folder = release_root / "step_llm"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_NAME,
        "step1_chat_tokenizer.model"]
    llm = load_step_llm(folder, dtype=torch.float32)
    assert llm.config.num_layers == 2 and llm.config.hidden_size == 96 and llm.alibi
    assert len(llm.state_dict()) == 1 + 6 * 2  # 289 = 1 + 6 * 48 at full size
    assert not llm.training and not any(p.requires_grad for p in llm.parameters())
    with torch.no_grad():
        out = llm(IDS)
        assert out.shape == (2, 7, 96)
        assert torch.equal(out, reference()(IDS))


def test_release_root_dtype_device_and_alibi_switch(release_root):
    llm = load_step_llm(release_root, dtype=torch.bfloat16, device="cpu", alibi=False)
    assert not llm.alibi
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        plain = load_step_llm(release_root, dtype=torch.float32, alibi=False)(IDS)
        biased = load_step_llm(release_root, dtype=torch.float32)(IDS)
    assert torch.equal(plain, reference(alibi=False)(IDS))
    assert not torch.allclose(plain, biased)


def test_single_safetensors_file_with_config(tmp_path):
    folder = tmp_path / "step_llm"
    folder.mkdir()
    save_file(tiny_step_llm_state_dict(), str(folder / "model.safetensors"))
    write_tiny_step_llm(tmp_path / "other", tokenizer=False)
    (folder / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    assert load_step_llm(folder, dtype=torch.float32).config.num_layers == 2


def test_dit_folder_given_as_step_llm_is_named(tmp_path):
    dit = write_tiny_dit(tmp_path / "dit", layout="transformer")
    with pytest.raises(CheckpointError, match="not a Step-LLM checkpoint.*Step-Video DiT"):
        load_step_llm(dit)


@pytest.mark.parametrize("field, value, message", [
    ("num_layers", 3, "num_layers: config.json says 3, the weights have 2"),
    ("hidden_size", 128, "hidden_size: config.json says 128, the weights have 96"),
    ("num_attention_groups", 1, "num_attention_groups: config.json says 1, the weights have 2"),
    ("ffn_hidden_size", 300, r"ffn_hidden_size \(rounded up to 256\): config.json says 512, the weights have 256"),
    ("padded_vocab_size", 1024, "padded_vocab_size: config.json says 1024, the weights have 512"),
])
def test_config_json_mismatch_names_the_field(release_root, copy_tree, field, value, message):
    folder = copy_tree(release_root / "step_llm")
    data = json.loads((folder / "config.json").read_text())
    data[field] = value
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        load_step_llm(folder)


def test_missing_or_foreign_config_json(release_root, copy_tree):
    folder = copy_tree(release_root / "step_llm")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_step_llm(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "StepVideoModel", "num_layers": 2}))
    with pytest.raises(CheckpointError, match="not a Step-LLM config.*StepVideoModel"):
        load_step_llm(folder)


def test_truncated_shard_is_refused(release_root, copy_tree):
    folder = copy_tree(release_root / "step_llm")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
        load_step_llm(folder)


def test_missing_shard_is_refused(release_root, copy_tree):
    folder = copy_tree(release_root / "step_llm")
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_step_llm(folder)


def test_missing_tensor_is_named(tmp_path):
    state = tiny_step_llm_state_dict()
    del state["transformer.layers.1.feed_forward.w2.weight"]
    folder = write_tiny_step_llm(tmp_path / "step_llm", tokenizer=False)
    for p in folder.glob("model*"):
        p.unlink()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing.*transformer.layers.1.feed_forward.w2.weight"):
        load_step_llm(folder)


def test_pickled_step_llm_is_refused(tmp_path):
    folder = write_tiny_step_llm(tmp_path / "step_llm", tokenizer=False)
    for p in folder.glob("model*"):
        p.unlink()
    torch.save(tiny_step_llm_state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights.*pytorch_model.bin"):
        load_step_llm(folder)


def test_missing_folder_and_file_path(tmp_path, release_root):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_step_llm(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is a file"):
        load_step_llm(release_root / "step_llm" / "config.json")
