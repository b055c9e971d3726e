"""Loading DiT checkpoints in every layout users have, and refusing bad ones clearly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import CheckpointError, load_transformer
from stepvideo_core.checkpoint import identify_checkpoint
from stepvideo_core.dit.loader import infer_config
from stepvideo_core.checkpoint import open_files
from tests.factory import TINY_DIT_CONFIG, tiny_dit_state_dict, write_dit_checkpoint, write_tiny_dit


def tiny_inputs(batch=1, frames=2, height=2, width=3, llm=5, clip=7, valid=4):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, clip + llm)
    mask[:, : clip + valid] = 1
    return dict(hidden_states=torch.randn(batch, frames, 64, height, width, generator=g),
                timestep=torch.full((batch,), 0.4),
                encoder_hidden_states=torch.randn(batch, llm, 96, generator=g),
                encoder_hidden_states_2=torch.randn(batch, clip, 48, generator=g),
                encoder_attention_mask=mask)


@pytest.fixture(scope="module")
def weights():
    return tiny_dit_state_dict(seed=1, dtype=torch.bfloat16)


def assert_weights_equal(model, state_dict):
    loaded = model.state_dict()
    assert set(loaded) == set(state_dict)
    for name, value in state_dict.items():
        assert torch.equal(loaded[name], value.to(loaded[name].dtype)), name


@pytest.mark.parametrize("layout", ["official", "transformer"])
def test_official_folder_layouts(tmp_path, weights, layout):
    path = write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path / "ckpt", layout=layout, shards=3)
    model = load_transformer(path, dtype=torch.bfloat16)
    assert len(list((tmp_path / "ckpt").rglob("*.safetensors"))) == 3
    assert model.config.num_layers == 2 and model.config.caption_channels == [96, 48]
    assert_weights_equal(model, weights)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "transformer."])
def test_single_file_with_known_prefixes_infers_config(tmp_path, weights, prefix):
    path = write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path, layout="single", prefix=prefix)
    model = load_transformer(path, dtype=torch.bfloat16)
    assert_weights_equal(model, weights)
    assert model.config.num_attention_heads == 2 and model.config.inner_dim == 256


def test_all_layouts_give_the_same_forward(tmp_path, weights):
    folder = load_transformer(write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path / "a"))
    single = load_transformer(write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path / "b", layout="single",
                                                   prefix="model.diffusion_model."))
    with torch.no_grad():
        assert torch.equal(folder(**tiny_inputs()), single(**tiny_inputs()))


def test_target_dtype_and_velocity_shape(tmp_path):
    model = load_transformer(write_tiny_dit(tmp_path), dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with torch.no_grad():
        out = model(**tiny_inputs(batch=2, frames=3, height=2, width=4))
    assert out.shape == (2, 3, 64, 2, 4) and torch.isfinite(out).all()


def test_infer_config_of_the_released_shapes():
    from stepvideo_core import build_transformer
    full = build_transformer(None)
    from stepvideo_core.checkpoint import TensorEntry, TensorIndex
    index = TensorIndex({k: TensorEntry(None, k, tuple(v.shape), "BF16") for k, v in full.state_dict().items()}, [])
    cfg = infer_config(index)
    assert cfg.to_dict() == {**full.config.to_dict(), "attention_type": cfg.attention_type}


# -- bad inputs -----------------------------------------------------------------

def test_vae_file_is_named_as_such(tmp_path):
    path = tmp_path / "vae_v2.safetensors"
    save_file({"decoder.conv_unpatchify.conv.conv.weight": torch.zeros(4, 2, 3, 3, 3),
               "encoder.conv_in.conv.weight": torch.zeros(2, 3, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="VAE v2"):
        load_transformer(path)


def test_step_llm_file_is_named_as_such(tmp_path):
    path = tmp_path / "model-00001-of-00001.safetensors"
    save_file({"tok_embeddings.word_embeddings.weight": torch.zeros(8, 4),
               "transformer.layers.0.attention.wqkv.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(CheckpointError, match="Step-LLM"):
        load_transformer(path)


def test_truncated_file(tmp_path, weights):
    path = write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path, layout="single")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(path)


def test_config_json_that_disagrees_with_the_weights(tmp_path, weights):
    folder = write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path, layout="transformer")
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"num_layers: config.json says 4, the weights have 2"):
        load_transformer(folder)


def test_foreign_config_json_in_the_transformer_folder(tmp_path, weights):
    folder = write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path, layout="transformer")
    (folder / "config.json").write_text(json.dumps({"architectures": ["Step1Model"], "hidden_size": 6144,
                                                    "num_attention_groups": 8}))
    with pytest.raises(CheckpointError, match="Step-LLM"):
        load_transformer(folder)


def test_missing_shard(tmp_path, weights):
    folder = write_dit_checkpoint(weights, TINY_DIT_CONFIG, tmp_path, layout="transformer", shards=2)
    next(folder.glob("*00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="1 are missing"):
        load_transformer(folder)


def test_missing_and_misshapen_tensors_are_named(tmp_path, weights):
    broken = dict(weights)
    del broken["transformer_blocks.1.attn2.wkv.weight"]
    broken["proj_out.bias"] = torch.zeros(65, dtype=torch.bfloat16)
    path = write_dit_checkpoint(broken, TINY_DIT_CONFIG, tmp_path, layout="single")
    with pytest.raises(CheckpointError) as info:
        load_transformer(path)
    message = str(info.value)
    assert "transformer_blocks.1.attn2.wkv.weight" in message
    assert "proj_out.bias expected [64] found [65]" in message
    assert "Step-Video DiT" in message


def test_pickles_are_refused(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    path.write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_transformer(path)


def test_empty_folder_says_what_it_expected(tmp_path):
    with pytest.raises(CheckpointError, match="expected a 'transformer/' subfolder"):
        load_transformer(tmp_path)


def test_lora_given_as_model(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"transformer_blocks.0.attn1.wqkv.lora_A.weight": torch.zeros(4, 256)}, str(path))
    with pytest.raises(CheckpointError, match="LoRA"):
        load_transformer(path)
    assert "LoRA" in identify_checkpoint(open_files([path]).keys())
