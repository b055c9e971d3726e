"""Loading VAE v2 files in the layouts users have, and refusing wrong files clearly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import CheckpointError, load_vae
from stepvideo_core.checkpoint import TensorEntry, TensorIndex
from stepvideo_core.vae import VAEConfig, infer_vae_config
from stepvideo_core.vae.loader import default_dtype, to_module_name
from tests.core.vae.test_keys import released_keys
from tests.factory import tiny_vae_state_dict, write_tiny_dit, write_tiny_vae


@pytest.fixture(scope="module")
def weights():
    return tiny_vae_state_dict(seed=5)


def assert_weights_equal(model, disk_state_dict):
    loaded = model.state_dict()
    assert set(loaded) == {to_module_name(k) for k in disk_state_dict}
    for name, value in disk_state_dict.items():
        assert torch.equal(loaded[to_module_name(name)], value.to(loaded[to_module_name(name)].dtype)), name


def test_official_layout_from_root_folder_and_file(tmp_path, weights):
    file = write_tiny_vae(tmp_path, state_dict=weights)
    assert file == tmp_path / "vae" / "vae_v2.safetensors"
    for path in (tmp_path, tmp_path / "vae", file):
        model = load_vae(path)
        assert_weights_equal(model, weights)
        assert model.config.z_channels == 8 and model.compute_dtype == torch.float32  # CPU default


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_single_file_with_known_prefixes(tmp_path, weights, prefix):
    path = write_tiny_vae(tmp_path, layout="single", prefix=prefix, state_dict=weights)
    assert path.parent == tmp_path
    assert_weights_equal(load_vae(path, dtype=torch.bfloat16, device="cpu"), weights)


def test_module_naming_of_conv_out_is_accepted_too(tmp_path, weights):
    renamed = {to_module_name(k): v for k, v in weights.items()}
    assert "decoder.conv_out.conv.weight" in renamed
    assert_weights_equal(load_vae(write_tiny_vae(tmp_path, layout="single", state_dict=renamed)), weights)


def test_default_dtype_is_bf16_on_cuda_fp32_on_cpu():
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cuda:1") == torch.bfloat16
    assert default_dtype("cpu") == torch.float32


def test_released_architecture_is_inferred_from_shapes():
    index = TensorIndex({k: TensorEntry(Path("vae_v2.safetensors"), k, tuple(s), "F32")
                         for k, s in released_keys().items()}, [Path("vae_v2.safetensors")])
    assert infer_vae_config(index) == VAEConfig()


def test_reduced_width_arch_is_inferred(tmp_path):
    cfg = dict(z_channels=4, enc_ch=32, enc_ch_mult=(1, 2, 2, 2), dec_ch=32, dec_ch_mult=(1, 1, 2, 2),
               num_res_blocks=1)
    model = load_vae(write_tiny_vae(tmp_path, config=cfg))
    assert model.config == VAEConfig(**cfg)
    assert model.encode(torch.zeros(1, 17, 3, 16, 16), sample=False).shape == (1, 3, 4, 1, 1)


def v1_like_state_dict(weights):
    """A file shaped like the old vae.safetensors: 16 latent channels, no (un)patchify layers."""
    sd = {k: v for k, v in weights.items() if "patchify" not in k}
    sd["encoder.conv_out.conv.weight"] = torch.zeros(32, 32, 3, 3, 3)
    sd["encoder.conv_out.conv.bias"] = torch.zeros(32)
    sd["decoder.conv_in.conv.weight"] = torch.zeros(32, 16, 3, 3, 3)
    sd["decoder.conv_in.conv.bias"] = torch.zeros(32)
    return sd


def test_v1_file_is_refused_naming_vae_v2(tmp_path, weights):
    path = tmp_path / "vae.safetensors"
    save_file(v1_like_state_dict(weights), str(path))
    with pytest.raises(CheckpointError, match=r"VAE v1.*16 latent channels.*vae_v2\.safetensors"):
        load_vae(path)


def test_folder_with_only_the_v1_file_is_refused(tmp_path, weights):
    (tmp_path / "vae").mkdir()
    save_file(v1_like_state_dict(weights), str(tmp_path / "vae" / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"vae_v2\.safetensors"):
        load_vae(tmp_path)


def test_folder_with_both_prefers_v2(tmp_path, weights):
    write_tiny_vae(tmp_path, state_dict=weights)
    save_file(v1_like_state_dict(weights), str(tmp_path / "vae" / "vae.safetensors"))
    assert_weights_equal(load_vae(tmp_path), weights)


def test_dit_given_as_vae_says_it_is_a_dit(tmp_path):
    path = write_tiny_dit(tmp_path, layout="single")
    with pytest.raises(CheckpointError, match=r"not a Step-Video VAE v2.*DiT"):
        load_vae(path)


def test_truncated_file(tmp_path, weights):
    path = write_tiny_vae(tmp_path, state_dict=weights)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(path)


def test_missing_and_wrong_shaped_tensors_are_named(tmp_path, weights):
    broken = dict(weights)
    del broken["decoder.up.0.block.2.conv2.conv.bias"]
    broken["encoder.mid.attn_1.q.conv.weight"] = torch.zeros(32, 32, 1, 1, 2)
    path = write_tiny_vae(tmp_path, layout="single", state_dict=broken)
    with pytest.raises(CheckpointError) as err:
        load_vae(path)
    message = str(err.value)
    assert "decoder.up.0.block.2.conv2.conv.bias" in message and "1 missing" in message
    assert "encoder.mid.attn_1.q.conv.weight expected [32, 32, 1, 1, 1] found [32, 32, 1, 1, 2]" in message


def test_unexpected_tensor_is_named(tmp_path, weights):
    path = write_tiny_vae(tmp_path, layout="single", state_dict={**weights, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected.*decoder\.extra\.weight"):
        load_vae(path)


def test_not_found_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no Step-Video VAE"):
        load_vae(tmp_path)


def test_pickled_files_are_refused(tmp_path):
    path = tmp_path / "vae_v2.pt"
    path.write_bytes(b"not a safetensors")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_vae(path)
