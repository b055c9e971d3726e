"""NaN/Inf never decodes to a 'successful' black video: the VAE says what is wrong instead."""

import pytest
import torch

from stepvideo_core.checks import NonFiniteError


def test_non_finite_latents_are_refused_before_decoding(tiny_vae):
    latents = torch.zeros(1, 6, 8, 1, 2)
    latents[0, 4, 3, 0, 1] = float("nan")
    latents[0, 5, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="latents to decode hold 2 NaN/Inf values"):
        tiny_vae.decode(latents)


def test_a_chunk_that_decodes_to_nan_names_the_chunk(tiny_vae):
    calls = []

    def nan_in_second_chunk(_module, _inputs, output):
        calls.append(1)
        return output.fill_(float("nan")) if len(calls) == 2 else output

    hook = tiny_vae.decoder.conv_out.register_forward_hook(nan_in_second_chunk)
    try:
        with pytest.raises(NonFiniteError, match="NaN/Inf in chunk 2 of 3 .*Decode in bf16 or fp32"):
            tiny_vae.decode(torch.zeros(1, 9, 8, 1, 2))
    finally:
        hook.remove()


def test_non_finite_frames_are_refused_before_encoding(tiny_vae):
    video = torch.zeros(1, 17, 3, 16, 16)
    video[0, 3, 1, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="frames to encode hold 1 NaN/Inf"):
        tiny_vae.encode(video)
