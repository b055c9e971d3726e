"""A Step-Video-TI2V transformer through every way of running it: scaled fp8 (quantised at load and
converted to a file), block streaming, LoRA adapters (merged, on the fly, streamed), on the tiny
TI2V DiT (128-channel patch embed, motion-score embedder).

Tolerances are those of the T2V tests each part mirrors:
* fp8 (tests/core/test_fp8.py): relative Frobenius error against fp32 per block and for the output
  <= 0.05 with the fp8 matmul, <= 0.04 with the dequantise path, and > 1e-4 (really quantised);
  the converted file equals quantising at load exactly;
* streaming (tests/core/offload/test_streamer.py): bit-identical to the unstreamed run;
* LoRA (tests/core/lora/test_apply.py): merged == weights computed by hand == on the fly within
  rtol = atol = 1e-5; the base weights come back bit for bit.
"""

import copy

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import convert, fp8, load_transformer
from stepvideo_core.cli import smoke_inputs
from stepvideo_core.lora import LoraEntry, attached, load_lora
from stepvideo_core.offload import BlockStreamer
from stepvideo_core.sampling import Placement, SamplingSettings, sample
from stepvideo_core.tiny import TINY_TI2V_DIT_CONFIG, tiny_lora, write_tiny_dit
from tests.capabilities import needs_cpu_fp8_matmul
from tests.core.lora.conftest import expected_state, rel, run, same, snapshot
from tests.core.sampling.conftest import conditioning, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = [pytest.param("matmul", 0.05, marks=needs_cpu_fp8_matmul), ("dequantize", 0.04)]
FIVE = dict(TINY_TI2V_DIT_CONFIG, num_layers=5)
RUN = dict(width=32, height=32, frames=17, steps=2, cfg=9.0, shift=13.0, seed=5, motion_score=5.0)


def image_latent(shape=(1, 3, 64, 2, 2), seed=0):
    condition = torch.zeros(shape)
    condition[:, :1] = torch.randn(shape[0], 1, *shape[2:], generator=torch.Generator().manual_seed(seed))
    return condition


@pytest.fixture(scope="module")
def ti2v_src(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("ti2v") / "stepvideo-ti2v", config=TINY_TI2V_DIT_CONFIG)


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


# --------------------------------------------------------------------------- fp8

@pytest.mark.parametrize("mode, bound", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_ti2v_stays_within_the_t2v_error_bounds(ti2v_src, mode, bound, dtype):
    reference = load_transformer(ti2v_src, dtype=torch.float32)
    model = load_transformer(ti2v_src, dtype=dtype, weight_format="fp8_scaled")
    assert model.is_ti2v and model.weight_format == "fp8_scaled"
    fp8.set_matmul_mode(model, mode)
    inputs = smoke_inputs(reference, frames=3, height=4, width=6)
    assert "condition_hidden_states" in inputs and inputs["motion_score"] == 5.0
    ref_blocks, ref_out = block_outputs(reference, inputs)
    blocks, out = block_outputs(model, inputs)
    errors = [rel(a, b) for a, b in zip(blocks, ref_blocks)]
    assert len(errors) == TINY_TI2V_DIT_CONFIG["num_layers"] and max(errors) <= bound, errors
    assert 1e-4 < rel(out, ref_out) <= bound


def test_fp8_quantises_only_block_linears_of_a_ti2v_model(ti2v_src):
    model = load_transformer(ti2v_src, dtype=torch.bfloat16, weight_format="fp8_scaled")
    quantised = {n for n, m in fp8.fp8_layers(model).items() if m.is_fp8}
    assert quantised and all(n.startswith("transformer_blocks.") for n in quantised)
    state = model.state_dict()
    assert state["pos_embed.proj.weight"].dtype == torch.bfloat16 and state["pos_embed.proj.weight"].shape[1] == 128
    assert state["adaln_single.emb.motion_score_embedder.linear_1.weight"].dtype == torch.bfloat16


def test_converted_ti2v_file_equals_quantising_at_load_and_stays_ti2v(ti2v_src, tmp_path):
    out = convert.convert_to_fp8(ti2v_src, tmp_path / "ti2v_fp8.safetensors")
    from_file = load_transformer(out, dtype=torch.float32)  # a single file: TI2V told from the weights alone
    at_load = load_transformer(ti2v_src, dtype=torch.float32, weight_format="fp8_scaled")
    assert from_file.is_ti2v and from_file.weight_format == "fp8_scaled"
    a, b = from_file.state_dict(), at_load.state_dict()
    assert set(a) == set(b) and "adaln_single.emb.motion_score_embedder.linear_2.weight" in a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()), k


# --------------------------------------------------------------------------- block streaming

@pytest.fixture(scope="module")
def five():
    return tiny_model(torch.float32, config=FIVE)


@pytest.fixture(scope="module")
def cond():
    return conditioning(1, valid=5, config=FIVE), conditioning(2, valid=2, config=FIVE)


@pytest.fixture(scope="module")
def resident(five, cond):
    """The reference: an unstreamed deep copy, sampled with every block in place."""
    return sample(copy.deepcopy(five), *cond, settings=SamplingSettings(**RUN),
                  placement=Placement(streamer_mode="none"), condition=image_latent())


def homes(model):
    return {name: t.data_ptr() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("blocks_on_device", [0, 1, 3])
def test_streamed_ti2v_is_bit_identical(five, cond, resident, blocks_on_device):
    before = homes(five)
    out = sample(five, *cond, settings=SamplingSettings(**RUN),
                 placement=Placement(blocks_on_device=blocks_on_device, streamer_mode="copy"), condition=image_latent())
    assert torch.equal(out, resident)
    assert homes(five) == before


def test_streamed_fp8_ti2v_is_bit_identical(tmp_path, cond):
    src = write_tiny_dit(tmp_path / "sv", config=FIVE)
    q = load_transformer(src, dtype=torch.float32, weight_format="fp8_scaled")
    fp8.set_matmul_mode(q, "dequantize")  # every torch has this path
    whole = sample(q, *cond, settings=SamplingSettings(**RUN), condition=image_latent())
    streamed = sample(q, *cond, settings=SamplingSettings(**RUN),
                      placement=Placement(blocks_on_device=1, streamer_mode="copy"), condition=image_latent())
    assert torch.equal(streamed, whole)


# --------------------------------------------------------------------------- LoRA

@pytest.fixture(scope="module")
def model():
    return tiny_model(torch.float32, config=TINY_TI2V_DIT_CONFIG)


@pytest.fixture(scope="module")
def inputs(model):
    return smoke_inputs(model, frames=2, height=2, width=3, text_tokens=6)


@pytest.fixture(scope="module")
def lora(model, tmp_path_factory):
    """A PEFT adapter for the TI2V DiT: every block layer (split q/k/v names), the usual outside layers,
    both motion-score embedder Linears and the 128-channel patch-embed conv.  Returns (adapter, truth)."""
    state, truth = tiny_lora(config=TINY_TI2V_DIT_CONFIG, style="diffusers", keys="peft", rank=4, seed=3)
    gen = torch.Generator().manual_seed(9)
    for name, rows, cols in (("adaln_single.emb.motion_score_embedder.linear_1", 256, 256),
                             ("adaln_single.emb.motion_score_embedder.linear_2", 256, 256)):
        down, up = torch.randn(4, cols, generator=gen) / cols ** 0.5, torch.randn(rows, 4, generator=gen) * 0.05
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
        truth.append(dict(module=name, part=None, down=down, up=up, scale=1.0))
    conv_down = torch.randn(4, 128, 1, 1, generator=gen) / 128 ** 0.5
    conv_up = torch.randn(256, 4, 1, 1, generator=gen) * 0.05
    state["pos_embed.proj.lora_A.weight"], state["pos_embed.proj.lora_B.weight"] = conv_down, conv_up
    path = tmp_path_factory.mktemp("ti2v_lora") / "ti2v.safetensors"
    save_file(state, str(path))
    adapter = load_lora(path, model)
    assert not adapter.unmatched, adapter.unmatched
    return adapter, truth, (conv_down, conv_up)


def hand_computed(model, truth, conv, strength):
    """``model``'s state with the adapter added by hand (linear layers by expected_state, the conv here)."""
    state = expected_state(model.state_dict(), truth, strength)
    down, up = conv
    state["pos_embed.proj.weight"] += strength * (up.flatten(1) @ down.flatten(1)).reshape(256, 128, 1, 1)
    other = tiny_model(torch.float32, config=TINY_TI2V_DIT_CONFIG)
    other.load_state_dict(state)
    return other


def test_ti2v_lora_merged_equals_hand_computed_and_on_the_fly(model, inputs, lora):
    adapter, truth, conv = lora
    targets = {p.target.module for p in adapter.patches}
    assert {"pos_embed.proj", "adaln_single.emb.motion_score_embedder.linear_1"} <= targets
    snap = snapshot(model)
    base = run(model, inputs)
    want = run(hand_computed(model, truth, conv, 0.8), inputs)
    with attached(model, [LoraEntry(adapter, 0.8, "merge")]):
        merged = run(model, inputs)
    with attached(model, [LoraEntry(adapter, 0.8, "on_the_fly")]) as att:
        assert "pos_embed.proj" in att.hooked
        hooked = run(model, inputs)
    assert same(model, snap)
    assert rel(merged, base) > 1e-2
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks_on_device", [0, 1])
def test_ti2v_lora_on_streamed_blocks(model, inputs, lora, blocks_on_device):
    adapter, _, _ = lora
    snap = snapshot(model)
    with attached(model, [LoraEntry(adapter, 0.9)], mode="merge"):
        want = run(model, inputs)
    with attached(model, [LoraEntry(adapter, 0.9)], blocks_on_device=blocks_on_device):
        with BlockStreamer(model, "cpu", blocks_on_device, mode="copy"):
            got = run(model, inputs)
    assert same(model, snap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
