"""The released 30B DiT, built on the meta device, has exactly the checkpoint's 785 tensors."""

import pytest
import torch

from stepvideo_core import StepVideoDiTConfig, build_transformer

D = 6144
NON_BLOCK = {
    "pos_embed.proj.weight": [D, 64, 1, 1], "pos_embed.proj.bias": [D],
    "adaln_single.emb.timestep_embedder.linear_1.weight": [D, 256],
    "adaln_single.emb.timestep_embedder.linear_1.bias": [D],
    "adaln_single.emb.timestep_embedder.linear_2.weight": [D, D],
    "adaln_single.emb.timestep_embedder.linear_2.bias": [D],
    "adaln_single.linear.weight": [6 * D, D], "adaln_single.linear.bias": [6 * D],
    "caption_projection.linear_1.weight": [D, 6144], "caption_projection.linear_1.bias": [D],
    "caption_projection.linear_2.weight": [D, D], "caption_projection.linear_2.bias": [D],
    "clip_projection.weight": [D, 1024], "clip_projection.bias": [D],
    "scale_shift_table": [2, D], "proj_out.weight": [64, D], "proj_out.bias": [64],
}
PER_BLOCK = {
    "norm1.weight": [D], "norm1.bias": [D],
    "attn1.wqkv.weight": [3 * D, D], "attn1.wo.weight": [D, D],
    "attn1.q_norm.weight": [128], "attn1.k_norm.weight": [128],
    "norm2.weight": [D], "norm2.bias": [D],
    "attn2.wq.weight": [D, D], "attn2.wkv.weight": [2 * D, D], "attn2.wo.weight": [D, D],
    "attn2.q_norm.weight": [128], "attn2.k_norm.weight": [128],
    "ff.net.0.proj.weight": [4 * D, D], "ff.net.2.weight": [D, 4 * D],
    "scale_shift_table": [6, D],
}


@pytest.fixture(scope="module")
def full_model():
    return build_transformer(None)  # meta device: no memory


def test_released_config_defaults():
    cfg = StepVideoDiTConfig()
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.inner_dim) == (48, 48, 128, 6144)
    assert cfg.caption_channels == [6144, 1024] and cfg.in_channels == cfg.out_channels == 64


def test_exactly_the_785_checkpoint_tensors(full_model):
    expected = dict(NON_BLOCK)
    for i in range(48):
        expected.update({f"transformer_blocks.{i}.{k}": v for k, v in PER_BLOCK.items()})
    got = {k: list(v.shape) for k, v in full_model.state_dict().items()}
    assert len(got) == 785
    assert got == expected


def test_parameter_count_and_meta_device(full_model):
    assert full_model.num_parameters() == 29_342_478_400
    assert all(p.device.type == "meta" for p in full_model.parameters())


def test_no_keys_for_affine_free_norms(full_model):
    names = set(full_model.state_dict())
    assert not any(k.startswith(("norm_out.", "caption_norm.")) for k in names)
    assert not any(".ff.net.1." in k for k in names)


def test_int_caption_channels_means_no_clip_projection():
    model = build_transformer(dict(num_layers=1, num_attention_heads=1, caption_channels=32))
    assert "clip_projection.weight" not in model.state_dict()
    assert model.state_dict()["caption_projection.linear_1.weight"].shape == (128, 32)
    assert model.state_dict()["pos_embed.proj.weight"].dtype == torch.float32
