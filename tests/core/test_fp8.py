"""Scaled fp8 weights: quantisation, the two matmul paths, error bounds on the tiny DiT, fp8 loading.

Error bounds (relative Frobenius error against the fp32 model with the same weights,
tiny DiT of tests/factory, measured ~0.013-0.024; bounds leave about 2x room):
per block and final output <= 0.05 with the fp8 matmul (weights and activations
in e4m3), <= 0.04 with the dequantise path (weights only).

Tests of the fp8 matmul path itself need a torch whose CPU ``torch._scaled_mm`` takes
row-wise scales (2.13 does, 2.9.1 does not): they carry the ``needs_cpu_fp8_matmul``
mark of tests/capabilities.py and skip elsewhere; what users of such a torch get (the
dequantise fallback) is tested under every torch in tests/core/test_fp8_fallback.py.
"""


import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stepvideo_core import fp8, load_transformer
from stepvideo_core.checkpoint import CheckpointError, load_weights, open_files
from stepvideo_core.cli import smoke_inputs
from stepvideo_core.tiny import tiny_dit_state_dict
from tests.factory import TINY_DIT_CONFIG, write_tiny_dit
from tests.capabilities import needs_cpu_fp8_matmul

E4M3_REL = 2.0 ** -4  # e4m3 keeps 3 mantissa bits: rounding error <= half an ulp = 2^-4 relative
NEEDS_MATMUL = needs_cpu_fp8_matmul  # skips where this torch lacks the kernel
MODES = [pytest.param("matmul", 0.05, marks=NEEDS_MATMUL), ("dequantize", 0.04)]
KNOWN_CPU_FP8_MATMUL = {(2, 9): False, (2, 13): True}  # the torches CI runs (ComfyUI users' and the newest)


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


# --------------------------------------------------------------------------- dequantise arithmetic, exactly


def e4m3_value(bits: int) -> float:
    """The value of float8_e4m3fn bit pattern ``bits``, decoded by hand (S.EEEE.MMM, bias 7, no inf)."""
    sign = -1.0 if bits & 0x80 else 1.0
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    assert not (exponent == 0xF and mantissa == 0x7), "NaN"
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def bf16_round(value: float) -> float:
    """``value`` (exactly representable in fp32) rounded to bf16, to nearest even, by hand."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def hand_made_fp8(out_features=6, in_features=5, seed=0):
    """(fp8 weight built from random bit patterns, the same values decoded by hand as python floats)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (out_features, in_features), generator=gen, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x38  # no NaNs: 1.0 instead
    bits[0, :4] = torch.tensor([0x7E, 0xFE, 0x01, 0x80], dtype=torch.uint8)  # 448, -448, 2^-9, -0
    return bits.view(torch.float8_e4m3fn), [[e4m3_value(int(b)) for b in row] for row in bits.tolist()]


def bit_patterns(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


SCALE_SHAPES = [(), (1,), (6,), (6, 1)]  # per tensor (ComfyUI's two spellings), per channel (ours, [out, 1])


def file_scale(shape, seed=1):
    """A scale_weight tensor of ``shape`` with arbitrary (not power-of-two) positive fp32 values."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) * 0.02 + 1e-3).float()


def expected_weight(values, scales, dtype):
    """fp8 value x scale per element, in python floats (exact: 4 x 24 significant bits fit a double),
    rounded once to ``dtype``; for bf16 the scale is rounded to bf16 first, as the layer does."""
    rows = []
    for row, s in zip(values, scales):
        if dtype == torch.bfloat16:
            rows.append([bf16_round(v * bf16_round(s)) for v in row])
        else:
            rows.append([v * s for v in row])
    return torch.tensor(rows, dtype=torch.float32).to(dtype)  # fp32 rounding of the exact product; bf16: exact


@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=str)
def test_normalize_scale_keeps_every_value_bit_for_bit(shape):
    scale = file_scale(shape)
    got = fp8.normalize_scale(scale, 6)
    flat = scale.reshape(-1).tolist()
    want = torch.tensor(flat * 6 if len(flat) == 1 else flat, dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert torch.equal(bit_patterns(got), bit_patterns(want))
    half = scale.to(torch.bfloat16)  # a file may store its scales in bf16: widened exactly
    assert torch.equal(fp8.normalize_scale(half, 6), torch.tensor([float(v) for v in half.reshape(-1)] *
                                                                  (6 if half.numel() == 1 else 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=str)
def test_dequantize_weight_is_fp8_value_times_scale_exactly(shape, dtype):
    w8, values = hand_made_fp8()
    scale = fp8.normalize_scale(file_scale(shape), 6)
    got = fp8.dequantize_weight(w8, scale, dtype)
    want = expected_weight(values, scale.tolist(), dtype)
    assert got.dtype == dtype and torch.equal(bit_patterns(got), bit_patterns(want))  # -0 stays -0 too


@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=str)
def test_dequantise_mode_layer_computes_with_exactly_that_weight(shape):
    """A pre-quantised layer (weight and scale_weight as a file holds them), dequantise mode, fp32."""
    w8, values = hand_made_fp8()
    scale_file = file_scale(shape)
    layer = fp8.ScaledFp8Linear(5, 6, bias=True, device="meta")
    assert layer.take_tensor("scale_weight", scale_file, torch.device("cpu"))
    assert layer.take_tensor("weight", w8, torch.device("cpu"))
    bias = torch.linspace(-0.3, 0.7, 6)
    layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    layer.matmul_mode = "dequantize"
    scales = scale_file.reshape(-1).tolist() * (6 if scale_file.numel() == 1 else 1)
    weight = expected_weight(values, scales, torch.float32)
    with torch.no_grad():
        # x = identity: each output is one weight (x 1, plus zeros), so no matmul rounding at all
        assert torch.equal(layer(torch.eye(5)), weight.t() + bias)
        x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
        assert torch.equal(layer(x), F.linear(x, weight) + bias)
    layer.dequantize_(torch.float32)
    assert not layer.is_fp8 and torch.equal(bit_patterns(layer.weight.data), bit_patterns(weight))


def make_layer(out_features=48, in_features=64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.nn.Linear(in_features, out_features, bias=bias)
    ref.weight.data = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    if bias:
        ref.bias.data = torch.randn(out_features, generator=gen) * 0.1
    layer = fp8.ScaledFp8Linear(in_features, out_features, bias=bias, device="meta")
    layer.quantize_on_load = True
    assert layer.take_tensor("weight", ref.weight.data, torch.device("cpu"))
    if bias:
        layer.bias = torch.nn.Parameter(ref.bias.data.clone(), requires_grad=False)
    return ref, layer


def test_the_probe_says_what_this_torch_can_do(monkeypatch):
    """The probe answers what a direct row-wise ``_scaled_mm`` call (other shapes, checked values) does."""
    gen = torch.Generator().manual_seed(2)
    a8, sa = fp8.quantize_rows(torch.randn(32, 16, generator=gen))
    b8, sb = fp8.quantize_rows(torch.randn(48, 16, generator=gen))
    try:
        got = torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.float32)
    except RuntimeError:
        works = False
    else:
        works = True
        want = (a8.float() * sa) @ (b8.float() * sb).t()  # the same fp8 values, multiplied in fp32
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(fp8, "_FP8_MATMUL_PROBED", {})
    assert fp8.fp8_matmul_supported(torch.device("cpu")) is works
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version in KNOWN_CPU_FP8_MATMUL:
        assert works is KNOWN_CPU_FP8_MATMUL[version], torch.__version__


@pytest.mark.parametrize("mode, bound", MODES)
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


@NEEDS_MATMUL
def test_matmul_path_is_the_scaled_mm_of_dynamically_quantised_rows():
    _, layer = make_layer(bias=False)
    layer.matmul_mode = "matmul"
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(4))
    x8, sx = fp8.quantize_rows(x)
    expected = torch._scaled_mm(x8, layer.weight.t(), scale_a=sx, scale_b=layer.scale_weight[None],
                                out_dtype=torch.float32)
    assert torch.equal(layer(x), expected)


@NEEDS_MATMUL
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


@pytest.mark.parametrize("mode, bound", MODES)
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
