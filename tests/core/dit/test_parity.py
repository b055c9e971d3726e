"""Parity of our DiT with the official StepVideoModel (fixture made by the official code).

Tolerances (both hold on every CPU; see tests/fixtures/README.md):
* fp32: max relative error max|ours - official| / max|official| <= 1e-5 for the
  output and every saved activation (we reach ~2e-6; the residue is summation order).
* bf16: never compared with the fixture's bf16 output.  bf16 matmuls round differently
  from CPU to CPU (AMD EPYC vs Intel, AVX2 vs AVX-512/AMX kernels), so our bf16 result
  differs from the file's by up to 1 bf16 ulp in about half the elements on some machines
  (0.03125 max in 5107 of 9216 under the AVX2 emulation), and the official code re-run
  there differs from it just as much.  What is machine-independent is the distance to
  the fp32 reference: ours must be no further from fp32 than the official bf16 run is,
  for the mean and for the max of |bf16 - fp32| (ratio <= 1.05 each).  Measured against
  the official's mean 0.006602 / max 0.03765: AMD EPYC with AVX-512 (where the file's
  bf16 is reproduced exactly) 0.006602 / 0.03765; its AVX2 emulation
  (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) 0.006684 / 0.03765 (ratio 1.012);
  SSE4.1 / default kernels 0.006659 / 0.03463.
* The bf16 quirks this bar is too coarse to see at this size (RoPE angles rounded to
  bf16 before cos/sin, t x 1000 in bf16) have their own targeted tests in test_rope.py;
  bit equality in bf16 is required only against the official code run live on the
  same machine (test_official_bitexact.py, opt-in).
"""

import math

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


def test_bf16_is_no_further_from_fp32_than_the_official_bf16(dit_fixture, tmp_path):
    """Mean and max of |ours_bf16 - fp32| are at most 1.05x the official bf16 run's own (any CPU)."""
    model = load_fixture_model(dit_fixture, tmp_path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = {k: v.to(torch.bfloat16) for k, v in dit_fixture.inputs.items()}  # as the pipeline casts them
    with torch.no_grad():
        out = model(**inputs)
    assert out.dtype == torch.bfloat16
    error = (out.float() - dit_fixture.outputs["fp32"]).abs()
    official_mean, official_max = dit_fixture.official_bf16_error()
    assert error.mean().item() <= official_mean * 1.05
    assert error.max().item() <= official_max * 1.05


def test_timestep_is_scaled_by_1000_in_bf16(dit_fixture, tmp_path):
    """Reference 2.8: sigma is cast to bf16 and x1000 is a bf16 product, before the fp32 sinusoid.

    The expected features come from the test's own float64 math on the bf16-rounded
    product; tolerance 2^-8, one bf16 ulp of the largest feature (|cos|, |sin| <= 1), so
    CPU-specific fp32 exp/cos/sin rounding cannot break it.  Scaling in fp32 instead moves
    0.8 -> 800.78125 (not 800) and the features by up to ~1.
    """
    model = load_fixture_model(dit_fixture, tmp_path, torch.bfloat16)
    seen = []
    linear_1 = model.adaln_single.emb.timestep_embedder.linear_1
    handle = linear_1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    inputs = {k: v.to(torch.bfloat16) for k, v in dit_fixture.inputs.items()}
    inputs["timestep"] = torch.tensor([0.8, 0.37]).to(torch.bfloat16)  # the sampler hands sigma in bf16
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    (features,) = seen
    assert features.dtype == torch.bfloat16 and features.shape == (2, 256)
    t1000 = (inputs["timestep"].double() * 1000).to(torch.float32).to(torch.bfloat16).double()  # one bf16 rounding
    assert t1000.tolist() == [800.0, 370.0]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = t1000[:, None] * freqs[None, :]
    expected = torch.cat([args.cos(), args.sin()], dim=-1)  # cos first (flip_sin_to_cos)
    assert (features.double() - expected).abs().max().item() <= 2 ** -8
