"""Scaled fp8 weights: quantisation, the two matmul paths, error bounds on the tiny DiT, fp8 loading.

Error bounds (relative Frobenius error against the fp32 model with the same weights,
tiny DiT of tests/factory, measured ~0.013-0.024; bounds leave about 2x room):
per block and final output <= 0.05 with the fp8 matmul (weights and activations
in e4m3), <= 0.04 with the dequantise path (weights only).
"""


import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import fp8, load_transformer
from stepvideo_core.checkpoint import CheckpointError, load_weights, open_files
from stepvideo_core.cli import smoke_inputs
from stepvideo_core.tiny import tiny_dit_state_dict
from tests.factory import TINY_DIT_CONFIG, write_tiny_dit

E4M3_REL = 2.0 ** -4  # e4m3 keeps 3 mantissa bits: rounding error <= half an ulp = 2^-4 relative


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_rows_uses_the_full_range_of_every_row():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen) * torch.logspace(-4, 2, 64)[:, None]
    w[5] = 0.0
    w8, scale = fp8.quantize_rows(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    assert torch.isfinite(w8.float()).all() and torch.equal(w8[5].float(), torch.zeros(96))
    peaks = w8.float().abs().amax(dim=1)
    assert torch.equal(peaks[torch.arange(64) != 5], torch.full((63,), 448.0))
    back = w8.float() * scale
    assert bool(((back - w).abs() <= w.abs() * E4M3_REL + scale * 2.0 ** -9).all())


def test_quantize_rows_chunks_give_the_same_result(monkeypatch):
    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    whole = fp8.quantize_rows(x)
    monkeypatch.setattr(fp8, "_CHUNK_ELEMENTS", 100)  # 2 rows per chunk
    chunked = fp8.quantize_rows(x)
    assert torch.equal(whole[0].float(), chunked[0].float()) and torch.equal(whole[1], chunked[1])


def test_scale_shapes_from_files():
    assert torch.equal(fp8.normalize_scale(torch.tensor(0.5), 3), torch.full((3,), 0.5))
    assert torch.equal(fp8.normalize_scale(torch.tensor([[1.0], [2.0]]), 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="3 values"):
        fp8.normalize_scale(torch.ones(3), 4)


def make_layer(out_features=48, in_features=64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.nn.Linear(in_features, out_features, bias=bias)
    ref.weight.data = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    if bias:
        ref.bias.data = torch.randn(out_features, generator=gen) * 0.1
    layer = fp8.ScaledFp8Linear(in_features, out_features, bias=bias, device="meta")
    layer.quantize_on_load = True
    assert layer.take_tensor("weight", ref.weight.data, torch.device("cpu"), None)
    if bias:
        layer.bias = torch.nn.Parameter(ref.bias.data.clone(), requires_grad=False)
    return ref, layer


def test_cpu_supports_the_fp8_matmul():
    assert fp8.fp8_matmul_supported(torch.device("cpu"))


@pytest.mark.parametrize("mode, bound", [("matmul", 0.05), ("dequantize", 0.04)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_paths_stay_close_to_the_full_precision_layer(mode, bound, dtype):
    ref, layer = make_layer()
    layer.matmul_mode = mode
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x)
        got = layer(x.to(dtype))
    assert got.dtype == dtype and got.shape == want.shape
    assert rel(got, want) <= bound


def test_matmul_path_is_the_scaled_mm_of_dynamically_quantised_rows():
    _, layer = make_layer(bias=False)
    layer.matmul_mode = "matmul"
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(4))
    x8, sx = fp8.quantize_rows(x)
    expected = torch._scaled_mm(x8, layer.weight.t(), scale_a=sx, scale_b=layer.scale_weight[None],
                                out_dtype=torch.float32)
    assert torch.equal(layer(x), expected)


def test_activation_scales_are_per_row_never_unit():
    """Rows of very different magnitude keep their own precision (a unit scale would flush small rows)."""
    ref, layer = make_layer(bias=False)
    layer.matmul_mode = "matmul"
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    x[0] *= 1e-4
    x[1] *= 1e3
    with torch.no_grad():
        got, want = layer(x), ref(x)
    for r in range(2):
        assert rel(got[r], want[r]) <= 0.05


def test_plain_weights_behave_like_nn_linear_and_dequantize_back():
    ref, _ = make_layer()
    plain = fp8.ScaledFp8Linear(64, 48)
    plain.load_state_dict(ref.state_dict())
    x = torch.randn(3, 64)
    assert not plain.is_fp8 and torch.equal(plain(x), ref(x))
    _, layer = make_layer()
    layer.dequantize_(torch.float32)
    assert not layer.is_fp8 and "scale_weight" not in layer.state_dict()
    assert rel(layer.weight, ref.weight) <= 0.04
    with pytest.raises(ValueError, match="matmul mode"):
        fp8.set_matmul_mode(torch.nn.Sequential(layer), "fast")


# --------------------------------------------------------------------------- the tiny DiT


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("fp8") / "stepvideo-t2v")


def block_outputs(model, inputs):
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.transformer_blocks]
    try:
        with torch.no_grad():
            final = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


@pytest.mark.parametrize("mode, bound", [("matmul", 0.05), ("dequantize", 0.04)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_dit_error_per_block_and_output(tiny_src, mode, bound, dtype):
    reference = load_transformer(tiny_src, dtype=torch.float32)
    model = load_transformer(tiny_src, dtype=dtype, weight_format="fp8_scaled")
    fp8.set_matmul_mode(model, mode)
    inputs = smoke_inputs(reference, frames=3, height=4, width=6)
    ref_blocks, ref_out = block_outputs(reference, inputs)
    blocks, out = block_outputs(model, inputs)
    errors = [rel(a, b) for a, b in zip(blocks, ref_blocks)]
    assert len(errors) == TINY_DIT_CONFIG["num_layers"]
    assert max(errors) <= bound, errors
    assert rel(out, ref_out) <= bound
    assert rel(out, ref_out) > 1e-4  # really quantised


def test_fp8_load_keeps_everything_but_block_linears_in_the_compute_dtype(tiny_src):
    model = load_transformer(tiny_src, dtype=torch.bfloat16, weight_format="fp8_scaled")
    assert model.weight_format == "fp8_scaled"
    layers = fp8.fp8_layers(model)
    quantised = {n for n, m in layers.items() if m.is_fp8}
    assert quantised == {n for n in layers if n.startswith("transformer_blocks.")}
    assert len(quantised) == 7 * TINY_DIT_CONFIG["num_layers"]  # wqkv, wo, wq, wkv, wo, ff.0, ff.2
    for name, tensor in model.state_dict().items():
        if name.endswith(".scale_weight"):
            assert tensor.dtype == torch.float32 and tensor.ndim == 1
        elif name[:-len(".weight")] in quantised:
            assert tensor.dtype == torch.float8_e4m3fn, name
        else:
            assert tensor.dtype == torch.bfloat16, name  # norms, biases, tables, embeddings, proj_out
    full = load_transformer(tiny_src, dtype=torch.bfloat16)
    saved = sum(layers[n].weight.numel() * (2 - 1) - layers[n].out_features * 4 for n in quantised)
    assert fp8.weight_bytes(model) == fp8.weight_bytes(full) - saved  # 1 byte per weight + fp32 row scales
    assert model.num_parameters() == full.num_parameters()


def test_prequantised_file_with_per_tensor_scales_loads(tmp_path):
    """The ComfyUI 'scaled fp8' variant: one scalar scale_weight per layer, plus the marker key."""
    state = tiny_dit_state_dict(seed=0)
    name = "transformer_blocks.0.ff.net.2.weight"
    w = state[name]
    scale = w.abs().max() / 448
    state[name] = (w / scale).to(torch.float8_e4m3fn)
    state["transformer_blocks.0.ff.net.2.scale_weight"] = scale.reshape(())
    state["transformer_blocks.0.ff.net.2.scale_input"] = torch.tensor(1.0)
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "comfy_fp8.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, str(path))
    model = load_transformer(path, dtype=torch.float32)  # auto-detected
    layer = model.get_submodule("transformer_blocks.0.ff.net.2")
    assert model.weight_format == "fp8_scaled" and layer.is_fp8
    assert torch.equal(layer.scale_weight, scale.expand(layer.out_features))
    assert not model.get_submodule("transformer_blocks.0.ff.net.0.proj").is_fp8  # stored full in that file
    full = load_transformer(path, dtype=torch.float32, weight_format="full")
    assert not fp8.fp8_layers(full) or not any(m.is_fp8 for m in fp8.fp8_layers(full).values())
    assert rel(full.get_submodule("transformer_blocks.0.ff.net.2").weight, w) <= 0.04


def test_take_hook_sees_raw_tensors_first(tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({"a.weight": torch.ones(2, 2, dtype=torch.bfloat16), "b.weight": torch.ones(2, 2)}, str(path))
    module = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2, bias=False, device="meta"),
                                  "b": torch.nn.Linear(2, 2, bias=False, device="meta")})
    seen = []

    def take(name, tensor):
        seen.append((name, tensor.dtype))
        if name == "a.weight":
            module["a"].weight = torch.nn.Parameter(tensor * 3, requires_grad=False)
            return True
        return False

    load_weights(module, open_files([path]), dtype=torch.float32, take=take)
    assert sorted(seen) == [("a.weight", torch.bfloat16), ("b.weight", torch.float32)]
    assert module["a"].weight.dtype == torch.bfloat16 and float(module["a"].weight[0, 0]) == 3.0
    assert module["b"].weight.dtype == torch.float32


def test_scale_on_a_conv_is_refused(tmp_path):
    state = tiny_dit_state_dict(seed=0)
    state["pos_embed.proj.scale_weight"] = torch.tensor(1.0)
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="Linear layers only"):
        load_transformer(path)


def test_a_refusing_kernel_falls_back_to_dequantising(monkeypatch):
    ref, layer = make_layer(bias=False)
    x = torch.randn(4, 64)
    monkeypatch.setattr(fp8, "_FP8_MATMUL_PROBED", {})

    def refuse(*a, **k):
        raise RuntimeError("not supported")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with torch.no_grad():
        y = layer(x)  # auto: the probe itself fails -> dequantise
    assert rel(y, ref(x)) <= 0.04 and fp8._FP8_MATMUL_PROBED[("cpu", None)] is False
    monkeypatch.setattr(fp8, "_FP8_MATMUL_PROBED", {("cpu", None): True})  # probe passed, real call refuses
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    assert fp8._FP8_MATMUL_PROBED[("cpu", None)] is False
    layer.matmul_mode = "matmul"
    with pytest.raises(RuntimeError):
        layer(x)
