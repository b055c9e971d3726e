"""VAE bit-exactness against the official code run on *this* machine (opt-in).

bf16 (and large fp32) convolutions and GroupNorm round by the kernel that the CPU
library picks, and it picks by machine and by memory layout; so bf16 bit equality can
only be asked of the official code run here, on the same layouts (stepvideo_core/vae/layers.py
mirrors them).  This test builds the official VideoEncoder/VideoDecoder v2 through the
oracle script (the fixture's tiny config, plus one whose widths change between levels
so that the ``nin_shortcut`` convs run too), loads its weights into ours and requires
the full chunked decode (with seam blending) and the per-chunk encoder moments to be
bit-identical, in fp32 and bf16.  The posterior sample is not compared: its noise is
a seeding choice, not layer arithmetic.  Set STEPVIDEO_ORACLE_SRC (official checkout)
and STEPVIDEO_ORACLE (path to stepvideo_oracle.py); needs einops, diffusers,
transformers and imageio importable.
"""

import pytest
import torch

from stepvideo_core.vae import build_vae
from tests.oracle import needs_official_code, official_oracle

pytestmark = [needs_official_code, pytest.mark.usefixtures("one_thread")]

CONFIGS = {
    "tiny": {},  # the fixture's: every level 32 channels
    "widening": dict(enc_ch_mult=(1, 2, 2, 2), dec_ch_mult=(1, 1, 2, 2)),  # 32 <-> 64: nin_shortcut convs
}


def official_and_ours(config_name: str, dtype: torch.dtype):
    oracle = official_oracle()
    official, cfg = oracle.build_vae(seed=4, cfg=dict(oracle.TINY_VAE, **CONFIGS[config_name]))
    ours = build_vae({k: v for k, v in cfg.items() if k != "version"}, device="cpu", dtype=dtype)
    ours.load_state_dict({k: v.clone() for k, v in official.state_dict().items()})
    return official.to(dtype), ours


def assert_bit_identical(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    differing = int((got != expected).sum())
    assert differing == 0, f"{differing} of {got.numel()} values differ from the official code's"


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_bit_identical_to_official_on_this_machine(config_name, dtype):
    official, ours = official_and_ours(config_name, dtype)
    latents = torch.randn(1, 6, 8, 2, 3, generator=torch.Generator().manual_seed(6))  # two chunks: one seam
    with torch.inference_mode():
        expected = official.decode(latents.clone())
        got = ours.decode(latents, clamp=False)
    assert_bit_identical(got, expected)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_encoder_moments_bit_identical_to_official_on_this_machine(config_name, dtype):
    official, ours = official_and_ours(config_name, dtype)
    video = (torch.rand(1, 34, 3, 32, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1).to(dtype)
    with torch.inference_mode():
        expected = torch.cat([official.naive_encode(c) for c in video.split(17, dim=1)], dim=1)
        got = torch.cat([ours.encode_chunk(c) for c in video.split(17, dim=1)], dim=1)
    assert_bit_identical(got, expected)
