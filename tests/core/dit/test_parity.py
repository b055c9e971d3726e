"""Parity of our DiT with the official StepVideoModel (fixture made by the official code).

Tolerances:
* fp32: max relative error max|ours - official| / max|official| <= 1e-5 for the
  output and every saved activation (we reach ~2e-6; the residue is summation order).
* bf16: the fixture's CPU rounds bf16 matmuls differently from ours, so bit equality
  with the *file* is impossible (the official code re-run here differs from it just as
  much). We require max|delta| <= 2^-6 (half a bf16 ulp at the output's peak 4.7) and
  mean|delta| <= 2.5e-3; computing RoPE angles in fp32 instead of the official bf16
  rounding gives 2^-5 and 3.6e-3, so both bounds catch that quirk being lost.
"""

import torch

from stepvideo_core import load_transformer
from tests.factory import write_dit_checkpoint
from tests.oracle import rel_err


def load_fixture_model(fx, tmp_path, dtype):
    root = write_dit_checkpoint(fx.state_dict, fx.config, tmp_path / "stepvideo-t2v", layout="official")
    return load_transformer(root, dtype=dtype, device="cpu")


def capture_activations(model):
    """Forward hooks named like the fixture's activation keys."""
    acts = {}

    def keep(name):
        def hook(_module, _inputs, output):
            if name == "adaln_single":
                acts["adaln_single.t6"], acts["adaln_single.embedded_timestep"] = output
            else:
                acts[name] = output
        return hook

    for name in ("pos_embed", "adaln_single", "caption_projection", "clip_projection"):
        model.get_submodule(name).register_forward_hook(keep(name))
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(keep(f"transformer_blocks.{i}"))
    return acts


def test_fp32_output_and_every_activation(dit_fixture, tmp_path):
    model = load_fixture_model(dit_fixture, tmp_path, torch.float32)
    acts = capture_activations(model)
    with torch.no_grad():
        out = model(**dit_fixture.inputs)
    assert out.shape == dit_fixture.outputs["fp32"].shape
    assert rel_err(out, dit_fixture.outputs["fp32"]) <= 1e-5
    assert set(dit_fixture.activations) <= set(acts)
    for name, ref in dit_fixture.activations.items():
        assert acts[name].shape == ref.shape, name
        assert rel_err(acts[name], ref) <= 1e-5, name


def test_bf16_output_matches_official_bf16_path(dit_fixture, tmp_path):
    model = load_fixture_model(dit_fixture, tmp_path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = {k: v.to(torch.bfloat16) for k, v in dit_fixture.inputs.items()}  # as the pipeline casts them
    with torch.no_grad():
        out = model(**inputs)
    assert out.dtype == torch.bfloat16
    delta = (out.float() - dit_fixture.outputs["bf16"].float()).abs()
    assert delta.max().item() <= 2 ** -6
    assert delta.mean().item() <= 2.5e-3


def test_bf16_is_as_close_to_fp32_as_the_official_bf16(dit_fixture, tmp_path):
    """Our bf16 error against the fp32 reference is no larger than the official bf16's own error."""
    model = load_fixture_model(dit_fixture, tmp_path, torch.bfloat16)
    with torch.no_grad():
        out = model(**{k: v.to(torch.bfloat16) for k, v in dit_fixture.inputs.items()}).float()
    ref32 = dit_fixture.outputs["fp32"]
    official = (dit_fixture.outputs["bf16"].float() - ref32).abs().mean().item()
    ours = (out - ref32).abs().mean().item()
    assert ours <= official * 1.05
