"""The released VAE v2, built on the meta device, has exactly the 262 tensors of vae_v2.safetensors."""

from pathlib import Path

import pytest
import torch

from stepvideo_core import build_vae
from stepvideo_core.vae import VAEConfig, VAEConfigError
from stepvideo_core.vae.loader import to_disk_name, to_module_name

KEY_TABLE = Path(__file__).with_name("vae_v2_keys.txt")


def released_keys() -> dict:
    """On-disk name -> shape, from the table copied out of the reference's Appendix A."""
    table = {}
    for line in KEY_TABLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            table[name] = [int(v) for v in shape.strip("[]").split(",")]
    return table


@pytest.fixture(scope="module")
def full_vae():
    return build_vae(None)  # meta device: no memory


def test_released_config_defaults():
    cfg = VAEConfig()
    assert cfg.z_channels == 64 and cfg.num_res_blocks == 2
    assert cfg.encoder_widths == (128, 256, 512, 512) and cfg.decoder_widths == (128, 256, 512, 512)
    assert (cfg.enc_ch, cfg.enc_ch_mult, cfg.dec_ch, cfg.dec_ch_mult) == (32, (4, 8, 16, 16), 128, (1, 2, 4, 4))
    assert cfg.patch_channels == 2048


def test_exactly_the_262_released_tensors(full_vae):
    expected = released_keys()
    assert len(expected) == 262
    got = {to_disk_name(k): list(v.shape) for k, v in full_vae.state_dict().items()}
    assert got == expected


def test_parameter_count_and_meta_device(full_vae):
    assert full_vae.num_parameters() == 498_818_819
    assert all(p.device.type == "meta" for p in full_vae.parameters())


def test_decoder_has_three_res_blocks_per_level(full_vae):
    assert [len(level.block) for level in full_vae.decoder.up] == [3, 3, 3, 3]
    assert [len(level.block) for level in full_vae.encoder.down] == [2, 2, 2, 2]


def test_conv_out_rename_round_trip():
    assert to_module_name("decoder.conv_out.weight") == "decoder.conv_out.conv.weight"
    assert to_module_name("decoder.conv_out.conv.bias") == "decoder.conv_out.conv.bias"
    assert to_module_name("encoder.conv_out.conv.weight") == "encoder.conv_out.conv.weight"
    assert to_disk_name("decoder.conv_out.conv.bias") == "decoder.conv_out.bias"


def test_dtype_and_device_arguments():
    model = build_vae(dict(z_channels=8, enc_ch=32, enc_ch_mult=(1, 1, 1, 1), dec_ch=32,
                           dec_ch_mult=(1, 1, 1, 1)), device="meta", dtype=torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("bad, words", [
    (dict(enc_ch=48), "multiple of 32"),
    (dict(z_channels=256), "z_channels 256 does not fit"),
    (dict(dec_ch_mult=(1, 2, 4)), "same number"),
    (dict(num_res_blocks=0), "positive integer"),
    (dict(encoder_temporal_down=(1,)), "two temporal"),
])
def test_invalid_configs_are_refused(bad, words):
    with pytest.raises(VAEConfigError, match=words):
        VAEConfig(**bad)


def test_unknown_config_keys_are_named():
    with pytest.raises(VAEConfigError, match="ch_multi"):
        VAEConfig.from_dict({"ch_multi": (1, 2)})
