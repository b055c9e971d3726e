"""StepVideoLoraLoader without ComfyUI: folder listing, validation at load, stacking, report, and the sampler
running the stack (output changes, base weights bit-identical afterwards)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core.offload.planner import GiB
from stepvideo_core.tiny import write_tiny_lora
from tests.core.lora.conftest import same, snapshot
from tests.core.sampling.conftest import conditioning
from tests.nodes.test_sampler_wiring import CUDA, make_handle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def loras(models_dir):
    folder = models_dir / "loras"
    write_tiny_lora(folder / "style" / "split_kohya.safetensors", style="diffusers", keys="kohya", alpha=2.0)
    write_tiny_lora(folder / "fused_comfy.safetensors", style="official", keys="comfy", seed=3,
                    prefix="diffusion_model.")
    write_tiny_lora(folder / "peft", style="proj", keys="peft", alpha=8.0, prefix="transformer.")
    save_file({"double_blocks.0.img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
               "double_blocks.0.img_attn_qkv.lora_up.weight": torch.zeros(8, 4)}, str(folder / "hunyuan.safetensors"))
    return folder


def load(lora_mod, model, name, strength=1.0, mode="auto", blocks=""):
    out = lora_mod.StepVideoLoraLoader().load(model=model, lora_name=name, strength=strength, mode=mode, blocks=blocks)
    (handle,) = out["result"]
    return handle, out["ui"]["text"][0]


def test_registered_with_its_inputs(pack, loras):
    cls = pack.NODE_CLASS_MAPPINGS["StepVideoLoraLoader"]
    required = cls.INPUT_TYPES()["required"]
    # one socket for both kinds (a native MODEL gets a MODEL back; tests/e2e/test_native_lora.py)
    assert required["model"][0] == "STEPVIDEO_MODEL,MODEL" and cls.RETURN_TYPES == ("STEPVIDEO_MODEL,MODEL",)
    assert required["lora_name"][0] == ["fused_comfy.safetensors", "hunyuan.safetensors",
                                        "peft/adapter_model.safetensors", "style/split_kohya.safetensors"]
    strength = required["strength"][1]
    assert (strength["default"], strength["min"], strength["max"]) == (1.0, -10.0, 10.0)
    assert required["mode"][0] == ["auto", "merge", "on_the_fly"] and required["blocks"][0] == "STRING"


def test_loader_returns_a_new_handle_sharing_the_weights_and_reports(lora_mod, base, loras):
    handle, text = load(lora_mod, base, "style/split_kohya.safetensors", strength=0.5)
    assert handle is not base and handle.transformer is base.transformer and base.adapters == ()
    (entry,) = handle.adapters
    assert entry.strength == 0.5 and entry.mode == "auto" and entry.blocks is None
    n = len(entry.adapter.matched)
    assert "kohya/musubi" in text and f"{n} of {n} tensors matched" in text and "NOT matched" not in text
    assert "strength 0.5, mode auto" in text and "streamed blocks" in text


def test_chained_loaders_stack_and_peft_folders_use_their_config(lora_mod, base, loras):
    one, _ = load(lora_mod, base, "fused_comfy.safetensors", mode="merge")
    two, text = load(lora_mod, one, "peft/adapter_model.safetensors", strength=-1.0, mode="on_the_fly", blocks="1")
    assert [e.adapter.name for e in two.adapters] == ["fused_comfy.safetensors", "peft/adapter_model.safetensors"]
    assert two.adapters[0] is one.adapters[0] and len(one.adapters) == 1
    assert {p.scale for p in two.adapters[1].adapter.patches} == {2.0}  # lora_alpha 8 / r 4
    assert "model carries 2 LoRA(s)" in text and "blocks 1:" in text


def test_zero_matches_fails_in_the_loader(lora_mod, base, loras):
    with pytest.raises(ValueError, match="matched none of its 2 tensors"):  # a LoraError (of the pack's copy)
        load(lora_mod, base, "hunyuan.safetensors")


def test_bad_block_filters_fail_in_the_loader(lora_mod, base, loras):
    with pytest.raises(ValueError, match="outside the model's blocks 0-1"):
        load(lora_mod, base, "fused_comfy.safetensors", blocks="0-5")
    with pytest.raises(FileNotFoundError):
        load(lora_mod, base, "missing.safetensors")


def test_cache_follows_the_file(lora_mod, base, loras):
    first = load(lora_mod, base, "fused_comfy.safetensors")[0].adapters[0].adapter
    again = load(lora_mod, base, "fused_comfy.safetensors", strength=0.3)[0].adapters[0].adapter
    assert again is first
    write_tiny_lora(loras / "fused_comfy.safetensors", style="official", keys="comfy", seed=4, rank=2)
    changed = load(lora_mod, base, "fused_comfy.safetensors")[0].adapters[0].adapter
    assert changed is not first and {p.rank for p in changed.patches} == {2}


def test_sampler_applies_the_stack_and_leaves_the_base_untouched(lora_mod, sampler_mod, base, loras):
    pos, neg = conditioning(1), conditioning(2)
    args = dict(preset="Step-Video-T2V-Turbo", width=32, height=32, frames=17, steps=2, cfg=0.0, shift=0.0, seed=3)
    snap = snapshot(base.transformer)
    plain = sampler_mod.StepVideoSampler().sample(model=base, positive=pos, negative=neg, **args)["result"][0]
    merged_handle, _ = load(lora_mod, base, "style/split_kohya.safetensors", mode="merge")
    hooked_handle, _ = load(lora_mod, base, "style/split_kohya.safetensors", mode="on_the_fly")
    merged = sampler_mod.StepVideoSampler().sample(model=merged_handle, positive=pos, negative=neg, **args)["result"][0]
    hooked = sampler_mod.StepVideoSampler().sample(model=hooked_handle, positive=pos, negative=neg, **args)["result"][0]
    assert same(base.transformer, snap)
    assert not torch.allclose(merged["samples"], plain["samples"], atol=1e-3)
    torch.testing.assert_close(hooked["samples"], merged["samples"], rtol=1e-4, atol=1e-4)


@pytest.fixture
def attachments(pack, monkeypatch):
    """Record, for every sampler run with adapters, what the attachment did while the model ran.

    Wraps the ``attached`` the sampler node imports (the pack's ``stepvideo_core.lora.apply``); each record
    holds the mode and blocks_on_device it was called with, the entries' modes, and -- taken after entry,
    before the lists are cleared on exit -- the ``merged`` and ``hooked`` layers, whether the model's weights
    then differ from a snapshot taken just before entry, and the layers carrying a forward hook.
    """
    apply = sys.modules[f"{pack.__name__}.stepvideo_core.lora.apply"]
    real = apply.attached
    records = []

    @contextmanager
    def spy(model, adapters, mode=None, blocks_on_device=None, **kwargs):
        before = snapshot(model)
        with real(model, adapters, mode, blocks_on_device, **kwargs) as attachment:
            records.append({"mode": mode, "blocks_on_device": blocks_on_device,
                            "entry_modes": [e.mode for e in attachment.entries],
                            "merged": sorted(attachment.merged), "hooked": sorted(attachment.hooked),
                            "weights_changed": not same(model, before),
                            "hooks": sorted(n for n, m in model.named_modules() if m._forward_hooks)})
            yield attachment

    monkeypatch.setattr(apply, "attached", spy)
    return records


def test_mode_widget_decides_merge_or_on_the_fly(lora_mod, sampler_mod, base, loras, attachments):
    """merge adds the update to the weights for the run; on_the_fly leaves them alone and hooks the same
    layers; both give the same video up to float rounding (auto on a CPU run, where every block is
    resident, merges)."""
    pos, neg = conditioning(1), conditioning(2)
    args = dict(preset="Step-Video-T2V-Turbo", width=32, height=32, frames=17, steps=2, cfg=0.0, shift=0.0, seed=3)
    snap = snapshot(base.transformer)
    outputs = {}
    for mode in ("merge", "on_the_fly", "auto"):
        handle, text = load(lora_mod, base, "style/split_kohya.safetensors", mode=mode)
        assert handle.adapters[0].mode == mode and f"mode {mode}" in text
        outputs[mode] = sampler_mod.StepVideoSampler().sample(model=handle, positive=pos, negative=neg,
                                                              **args)["result"][0]["samples"]
        assert attachments[-1]["entry_modes"] == [mode] and attachments[-1]["mode"] is None
    merged, hooked, auto = attachments
    layers = merged["merged"]
    assert "transformer_blocks.0.attn1.wqkv" in layers and "transformer_blocks.1.ff.net.2" in layers
    assert (merged["hooked"], merged["hooks"], merged["weights_changed"]) == ([], [], True)
    assert (hooked["merged"], hooked["hooked"], hooked["hooks"], hooked["weights_changed"]) == \
        ([], layers, layers, False)
    assert (auto["merged"], auto["hooked"], auto["weights_changed"]) == (layers, [], True)
    assert same(base.transformer, snap)
    torch.testing.assert_close(outputs["on_the_fly"], outputs["merge"], rtol=1e-4, atol=1e-4)
    assert torch.equal(outputs["auto"], outputs["merge"])  # the same mechanism, the same arithmetic


def test_auto_runs_the_streamed_blocks_on_the_fly(lora_mod, sampler_mod, types_mod, dit, loras, attachments,
                                                  fake_gpu, sample_calls):
    """On a (fake) GPU with one block kept resident, "auto" merges into block 0 and the layers outside the
    blocks, and hooks block 1, which the streamer copies into a slot every call."""
    fake_gpu(80 * GiB)
    gpu = make_handle(types_mod, dit, device=CUDA, blocks_on_device="1")
    handle, _ = load(lora_mod, gpu, "style/split_kohya.safetensors", mode="auto")
    sampler_mod.StepVideoSampler().sample(model=handle, positive=conditioning(1), negative=conditioning(2),
                                          preset="Step-Video-T2V-Turbo", width=32, height=32, frames=17, steps=1,
                                          cfg=0.0, shift=0.0, seed=3)
    (record,) = attachments
    assert record["blocks_on_device"] == 1 == sample_calls[-1]["blocks_on_device"]
    assert sample_calls[-1]["streamer"].streamed == [1]
    assert record["hooked"] and all(name.startswith("transformer_blocks.1.") for name in record["hooked"])
    assert any(name.startswith("transformer_blocks.0.") for name in record["merged"])
    assert not any(name.startswith("transformer_blocks.1.") for name in record["merged"])
