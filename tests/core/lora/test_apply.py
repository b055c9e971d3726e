"""Applying adapters: merged == on the fly == weights computed by hand; exact restore; stacking, filters,
fp8 (error bound) and streamed blocks."""

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import fp8, load_transformer
from stepvideo_core.lora import LoraEntry, LoraError, attached, load_lora, parse_blocks
from stepvideo_core.offload import BlockStreamer
from stepvideo_core.tiny import write_tiny_dit, write_tiny_lora
from tests.core.lora.conftest import expected_state, rel, run, same, snapshot
from tests.core.sampling.conftest import tiny_model

E4M3_REL = 2.0 ** -4


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    """Two adapters: split q/k/v names (kohya, alpha) and official fused names (PEFT, no alpha)."""
    folder = tmp_path_factory.mktemp("loras")
    a, truth_a = write_tiny_lora(folder / "a.safetensors", style="diffusers", keys="kohya", alpha=2.0, seed=1)
    b, truth_b = write_tiny_lora(folder / "b.safetensors", style="official", keys="peft", rank=8, seed=2)
    return (load_lora(a, model), truth_a), (load_lora(b, model), truth_b)


def model_with(state):
    """A fresh tiny model holding ``state`` (the weights computed by hand)."""
    other = tiny_model(torch.float32)
    other.load_state_dict(state)
    return other


def test_merged_output_equals_hand_computed_weights_and_on_the_fly(model, inputs, loras):
    (a, truth), _ = loras
    base = run(model, inputs)
    want = run(model_with(expected_state(model.state_dict(), truth, 0.8)), inputs)
    with attached(model, [LoraEntry(a, 0.8, "merge")]) as att:
        merged = run(model, inputs)
        assert att.hooked == [] and len(att.merged) == len({p.target.module for p in a.patches})
    with attached(model, [LoraEntry(a, 0.8, "on_the_fly")]) as att:
        hooked = run(model, inputs)
        assert att.merged == [] and len(att.hooked) == len({p.target.module for p in a.patches})
    assert rel(merged, base) > 1e-2                      # the adapter matters
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)


def test_stacked_adapters_with_strengths(model, inputs, loras):
    (a, truth_a), (b, truth_b) = loras
    state = expected_state(expected_state(model.state_dict(), truth_a, 0.7), truth_b, -1.3)
    want = run(model_with(state), inputs)
    entries = [LoraEntry(a, 0.7, "merge"), LoraEntry(b, -1.3, "on_the_fly")]
    with attached(model, entries):
        mixed = run(model, inputs)
    with attached(model, entries, mode="merge"):
        merged = run(model, inputs)
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


def test_many_toggles_leave_the_base_weights_bit_identical(model, inputs, loras):
    (a, _), (b, _) = loras
    snap = snapshot(model)
    base = run(model, inputs)
    for i in range(12):
        mode = ("merge", "on_the_fly", "auto")[i % 3]
        with attached(model, [LoraEntry(a, 1.0 + i / 10, mode), LoraEntry(b, -0.5, "merge")]):
            pass
    assert same(model, snap)
    assert torch.equal(run(model, inputs), base)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exceptions_and_interrupts_restore_everything(model, loras, error):
    (a, _), _ = loras
    snap = snapshot(model)
    with pytest.raises(error):
        with attached(model, [LoraEntry(a, 2.0, "merge"), LoraEntry(a, 1.0, "on_the_fly")]):
            assert not same(model, snap)
            raise error("stop")
    assert same(model, snap) and all(not m._forward_hooks for m in model.modules())
    with attached(model, [a]):   # usable again
        pass


def test_attaching_twice_is_refused(model, loras):
    (a, _), _ = loras
    with attached(model, [a]):
        with pytest.raises(RuntimeError, match="already attached"):
            with attached(model, [a]):
                pass
    with attached(model, []):  # nothing to do: fine
        pass


def test_block_filter_and_strength_zero(model, loras):
    (a, truth), _ = loras
    snap = snapshot(model)
    only_one = parse_blocks("1", model.config.num_layers)
    with attached(model, [LoraEntry(a, 1.0, "merge", blocks=only_one)]):
        state = model.state_dict()
        want = expected_state(dict(snap), [t for t in truth if t["module"].startswith("transformer_blocks.1.")])
        for name, value in state.items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
        assert torch.equal(state["transformer_blocks.0.attn1.wqkv.weight"], snap["transformer_blocks.0.attn1.wqkv.weight"])
        assert torch.equal(state["proj_out.weight"], snap["proj_out.weight"])  # outside the blocks: filtered out
    with attached(model, [LoraEntry(a, 0.0)]) as att:
        assert same(model, snap) and att.merged == [] and att.hooked == []


def test_parse_blocks():
    assert parse_blocks("", 48) is None and parse_blocks(None, 48) is None
    assert parse_blocks("0-11, 40", 48) == frozenset(list(range(12)) + [40])
    assert parse_blocks("3,3,5-5", 48) == frozenset({3, 5})
    with pytest.raises(ValueError, match="outside the model's blocks 0-47"):
        parse_blocks("40-48", 48)
    with pytest.raises(ValueError, match="not a number"):
        parse_blocks("a-b", 48)


def test_conv_lora_merged_equals_on_the_fly(model, inputs, tmp_path):
    gen = torch.Generator().manual_seed(4)
    state = {"lora_unet_pos_embed_proj.lora_down.weight": torch.randn(4, 64, 1, 1, generator=gen) / 8,
             "lora_unet_pos_embed_proj.lora_up.weight": torch.randn(256, 4, 1, 1, generator=gen) / 10,
             "lora_unet_pos_embed_proj.alpha": torch.tensor(4.0)}
    save_file(state, str(tmp_path / "conv.safetensors"))
    adapter = load_lora(tmp_path / "conv.safetensors", model)
    base = run(model, inputs)
    with attached(model, [LoraEntry(adapter, 1.0, "merge")]):
        merged = run(model, inputs)
    with attached(model, [LoraEntry(adapter, 1.0, "on_the_fly")]):
        hooked = run(model, inputs)
    assert rel(merged, base) > 1e-3
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)


def test_bias_difference_on_a_bias_free_layer_runs_on_the_fly(model, inputs, tmp_path):
    bias = torch.randn(768, generator=torch.Generator().manual_seed(5)) * 0.05
    save_file({"transformer_blocks.0.attn1.wqkv.diff_b": bias}, str(tmp_path / "b.safetensors"))
    adapter = load_lora(tmp_path / "b.safetensors", model)
    with attached(model, [LoraEntry(adapter, 1.0, "merge")]) as att:   # no bias to merge into: hooked
        assert att.hooked == ["transformer_blocks.0.attn1.wqkv"] and att.merged == []
        x = torch.randn(1, 3, 256)
        with torch.no_grad():
            got = model.transformer_blocks[0].attn1.wqkv(x)
            plain = torch.nn.functional.linear(x, model.transformer_blocks[0].attn1.wqkv.weight)
        torch.testing.assert_close(got, plain + bias)


def test_bf16_merge_and_on_the_fly_agree_and_restore(loras, inputs):
    (a, _), _ = loras
    model16 = tiny_model(torch.bfloat16)
    snap = snapshot(model16)
    base = run(model16, inputs)
    with attached(model16, [LoraEntry(a, 1.0, "merge")]):
        merged = run(model16, inputs)
    with attached(model16, [LoraEntry(a, 1.0, "on_the_fly")]):
        hooked = run(model16, inputs)
    assert same(model16, snap)
    assert rel(hooked, merged) < 2e-2 < rel(merged, base)


# --------------------------------------------------------------------------- fp8

@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    path = write_tiny_dit(tmp_path_factory.mktemp("dit"), layout="single", dtype=torch.float32)
    model = load_transformer(path, dtype=torch.float32, weight_format="fp8_scaled")
    assert model.transformer_blocks[0].attn1.wqkv.is_fp8
    return model


@pytest.mark.parametrize("matmul", ["dequantize", "auto"])
def test_fp8_merge_requantises_within_the_e4m3_bound_and_restores_bytes(fp8_model, model, inputs, loras, matmul):
    (a, truth), _ = loras
    fp8.set_matmul_mode(fp8_model, matmul)
    snap = snapshot(fp8_model)
    name = "transformer_blocks.0.attn1.wqkv"
    layer = fp8_model.get_submodule(name)
    stored = fp8.dequantize_weight(layer.weight, layer.scale_weight, torch.float32)  # what the fp8 base holds
    target = expected_state({name + ".weight": stored}, [t for t in truth if t["module"] == name])[name + ".weight"]
    with torch.no_grad(), attached(model, [LoraEntry(a, 1.0, "merge")]):
        reference = run(model, inputs)                      # fp32 weights + LoRA
    with attached(fp8_model, [LoraEntry(a, 1.0, "merge")]) as att:
        assert att.hooked == []
        assert layer.is_fp8
        back = fp8.dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
        bound = target.abs() * E4M3_REL + layer.scale_weight[:, None] * 2.0 ** -9
        assert bool(((back - target).abs() <= bound).all())  # fresh per-channel scales for W + dW
        merged = run(fp8_model, inputs)
    assert same(fp8_model, snap)                             # fp8 bytes and scales restored exactly
    with attached(fp8_model, [LoraEntry(a, 1.0, "auto")]) as att:  # auto: fp8 layers go on the fly
        assert "transformer_blocks.0.attn1.wqkv" in att.hooked
        assert "transformer_blocks.0.attn1.wqkv" not in att.merged
        hooked = run(fp8_model, inputs)
    assert same(fp8_model, snap)
    assert rel(merged, reference) < 0.05 and rel(hooked, reference) < 0.05
    fp8.set_matmul_mode(fp8_model, "auto")


# --------------------------------------------------------------------------- streamed blocks

@pytest.mark.parametrize("blocks_on_device", [0, 1])
def test_streamed_blocks_get_the_adapter_on_the_fly(model, inputs, loras, blocks_on_device):
    (a, _), (b, _) = loras
    entries = [LoraEntry(a, 0.9), LoraEntry(b, 0.5)]
    snap = snapshot(model)
    with attached(model, entries, mode="merge"):
        want = run(model, inputs)
    with attached(model, entries, blocks_on_device=blocks_on_device) as att:
        streamed = {f"transformer_blocks.{i}." for i in range(blocks_on_device, model.config.num_layers)}
        assert att.hooked and all(name.startswith(tuple(streamed)) for name in att.hooked)
        assert not any(name.startswith(tuple(streamed)) for name in att.merged)
        with BlockStreamer(model, "cpu", blocks_on_device, mode="copy"):
            got = [run(model, inputs) for _ in range(2)]
    assert same(model, snap)
    for out in got:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_adapter_for_another_architecture_is_refused_at_attach(loras):
    (a, _), _ = loras
    other = tiny_model(torch.float32, config=dict(num_attention_heads=2, attention_head_dim=128, in_channels=64,
                                                  num_layers=1, caption_channels=[96, 48]))
    with pytest.raises(LoraError, match="no layer 'transformer_blocks.1"):
        with attached(other, [a]):
            pass


def test_restore_reaches_tensors_swapped_in_meanwhile(fp8_model, loras):
    """A streamer pins host weights by replacing ``param.data`` (and buffers) with copies during a run;
    the merged values in those copies must be restored too."""
    (a, _), _ = loras
    snap = snapshot(fp8_model)
    layer = fp8_model.transformer_blocks[1].ff.net[2]
    with attached(fp8_model, [LoraEntry(a, 1.0, "merge")]):
        layer.weight.data = layer.weight.data.clone()                      # like pin_memory()
        layer.register_buffer("scale_weight", layer.scale_weight.clone())
    assert same(fp8_model, snap)


def test_auto_runs_on_the_fly_when_merge_backups_exceed_the_budget(model, inputs, loras):
    """"auto" merges small adapters but never keeps more weight backups than merge_budget;
    entries that ask for "merge" explicitly are still merged."""
    (a, _), (b, _) = loras
    entries = [LoraEntry(a, 0.8, "auto"), LoraEntry(b, -0.3, "merge")]
    with attached(model, entries, mode="merge"):
        reference = run(model, inputs)
    with attached(model, entries) as att:
        assert not att.hooked                            # tiny model: well under the default budget
    with attached(model, entries, merge_budget=0) as att:
        budgeted = run(model, inputs)
        hookable = {p.target.module for p in a.patches if p.target.leaf in ("weight", "bias")}
        assert hookable <= set(att.hooked)              # every auto Linear/Conv patch went on the fly
        assert {p.target.module for p in b.patches if p.target.leaf == "weight"} <= set(att.merged)
    torch.testing.assert_close(budgeted, reference, rtol=1e-5, atol=1e-5)
