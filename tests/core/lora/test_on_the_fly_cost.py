"""On-the-fly LoRA costs its rank-r products, not per-patch passes over the layer output.

The hook used to add each patch on its own: ``(x A^T) B^T``, times the scale, times the strength,
then added -- five operations and three full-size elementwise passes per patch, and a split q/k/v
LoRA puts three patches on the fused ``wqkv``.  Profiling bench/bench_lora.py showed those passes and
launches, not the rank-r GEMMs, made the +62-67 % forward time.  Now a layer's low-rank patches are one
stacked update: ``h = x D^T`` and ``output += h U^T`` inside the GEMM (``addmm_``), two operations
per hooked layer whatever the number of patches.  The result is the same update (held to the merge
and to a float64 reference here).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bench.op_count import OpCounter
from stepvideo_core.lora import LoraEntry, attached, load_lora
from stepvideo_core.lora import apply as lora_apply
from stepvideo_core.tiny import write_tiny_lora
from tests.core.lora.conftest import expected_state, run
from tests.core.sampling.conftest import tiny_model


def counted(model, inputs) -> Counter:
    with torch.inference_mode():
        model(**inputs)  # first use: adapters copied and stacked
        with OpCounter() as count:
            model(**inputs)
    return count.ops


@pytest.fixture(scope="module")
def split_qkv(model, tmp_path_factory):
    """A rank-4 adapter with split to_q/to_k/to_v names (three patches on each fused wqkv) and its truth."""
    path, truth = write_tiny_lora(tmp_path_factory.mktemp("cost") / "a.safetensors", style="diffusers",
                                  keys="kohya", alpha=2.0, seed=1)
    return load_lora(path, model), truth


def test_a_hooked_layer_costs_two_operations_whatever_its_patches(model, inputs, split_qkv):
    adapter, _ = split_qkv
    plain = counted(model, inputs)
    with attached(model, [LoraEntry(adapter, 0.8, "on_the_fly")]) as att:
        hooked = counted(model, inputs)
        layers = len(att.hooked)
    patches = len(adapter.patches)
    assert patches > layers  # q, k and v share a fused layer
    extra = hooked - plain
    assert sum(extra.values()) == 2 * layers, extra
    assert extra == Counter({"addmm_": layers, "mm": layers}) or extra == Counter({"addmm_": layers,
                                                                                   "linear": layers}), extra


def test_the_stacked_update_is_the_merged_weights_update(model, inputs, split_qkv):
    adapter, truth = split_qkv
    reference = tiny_model(torch.float64)
    reference.load_state_dict({k: v.double() for k, v in expected_state(model.state_dict(), truth, 0.8).items()})
    want = run(reference, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    with attached(model, [LoraEntry(adapter, 0.8, "on_the_fly")]):
        hooked = run(model, inputs)
    with attached(model, [LoraEntry(adapter, 0.8, "merge")]):
        merged = run(model, inputs)
    torch.testing.assert_close(hooked.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)


def test_two_adapters_on_one_layer_stack_into_one_update(model, inputs, split_qkv, tmp_path):
    adapter, truth = split_qkv
    path, truth_b = write_tiny_lora(tmp_path / "b.safetensors", style="official", keys="peft", rank=8, seed=2)
    other = load_lora(path, model)
    state = expected_state(expected_state(model.state_dict(), truth, 0.5), truth_b, -1.25)
    reference = tiny_model(torch.float32)
    reference.load_state_dict(state)
    entries = [LoraEntry(adapter, 0.5, "on_the_fly"), LoraEntry(other, -1.25, "on_the_fly")]
    plain = counted(model, inputs)
    with attached(model, entries) as att:
        hooked = run(model, inputs)
        assert sum((counted(model, inputs) - plain).values()) == 2 * len(att.hooked)
        hook = att._hook_objects[0]
        (down, up), = [v for v in hook.stacked.values() if v is not None]
        assert down.shape[0] == up.shape[1] == sum(p.rank for p, _ in hook.items)
    torch.testing.assert_close(hooked, run(reference, inputs), rtol=1e-5, atol=1e-5)


def test_a_non_contiguous_output_gets_the_update_out_of_place():
    from stepvideo_core.lora.adapter import Patch
    from stepvideo_core.lora.fuse import Target

    layer = torch.nn.Linear(8, 6, bias=False)
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 8, generator=gen), torch.randn(6, 2, generator=gen)
    hook = lora_apply._Hook([(Patch(Target("layer"), "lowrank", ("k",), down=down, up=up, scale=0.5), 2.0)])
    x = torch.randn(5, 8, generator=gen)
    output = torch.randn(6, 5, generator=gen).t()  # [5, 6], transposed: no flat view to add into
    before = output.clone()
    got = hook(layer, (x,), output)
    torch.testing.assert_close(got, before + (x @ down.t()) @ up.t(), rtol=1e-5, atol=1e-5)  # 0.5 x 2.0 = 1
    assert torch.equal(output, before)  # the layer's own tensor is left alone
