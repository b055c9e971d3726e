"""Every accepted adapter format loads, matches every key and changes the weights exactly as computed by hand;
foreign, broken and unsafe files fail with messages that say why."""

import json

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core.lora import LoraEntry, LoraError, attached, load_lora, read_adapter
from stepvideo_core.tiny import TINY_LORA_STYLES, tiny_lora, write_tiny_lora
from tests.core.lora.conftest import expected_state

PREFIXES = ["", "transformer.", "base_model.model.", "diffusion_model.", "model.diffusion_model.", "pipe.dit."]


def merged_state(model, adapter):
    """The model's weights while ``adapter`` is merged (the model is restored afterwards)."""
    with attached(model, [LoraEntry(adapter, 1.0, "merge")]):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("style", sorted(TINY_LORA_STYLES))
@pytest.mark.parametrize("keys", ["peft", "kohya", "comfy"])
def test_every_format_and_naming_matches_every_key_and_merges_exactly(model, tmp_path, style, keys):
    alpha = 2.0 if keys != "peft" else None
    path, truth = write_tiny_lora(tmp_path / "a.safetensors", style=style, keys=keys, alpha=alpha, rank=4)
    adapter = load_lora(path, model)
    assert adapter.unmatched == ()
    assert len(adapter.matched) == len(tiny_lora(style=style, keys=keys, alpha=alpha, rank=4)[0])
    assert len(adapter.patches) == len(truth)
    label = {"peft": "PEFT/diffusers", "kohya": "kohya/musubi", "comfy": "lora_down/lora_up"}[keys]
    assert label in adapter.format
    want = expected_state(model.state_dict(), truth)
    got = merged_state(model, adapter)
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
    changed = {t["module"] + ".weight" for t in truth}
    assert all(not torch.equal(got[k], model.state_dict()[k]) for k in changed)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_known_prefixes_are_removed(model, tmp_path, prefix):
    path, truth = write_tiny_lora(tmp_path / "a.safetensors", keys="peft", prefix=prefix)
    adapter = load_lora(path, model)
    assert adapter.unmatched == () and len(adapter.patches) == len(truth)
    if prefix:
        assert repr(prefix) in adapter.format


def test_peft_folder_takes_alpha_from_adapter_config(model, tmp_path):
    folder, truth = write_tiny_lora(tmp_path / "peft", keys="peft", alpha=8.0, rank=4, prefix="transformer.")
    assert (folder / "adapter_config.json").is_file()
    adapter = load_lora(folder, model)                                # the folder
    same_file = load_lora(folder / "adapter_model.safetensors", model)  # or the file inside it
    assert {p.scale for p in adapter.patches} == {2.0} == {p.scale for p in same_file.patches}
    torch.testing.assert_close(merged_state(model, adapter)["proj_out.weight"],
                               expected_state(model.state_dict(), truth)["proj_out.weight"], rtol=0, atol=1e-6)


def test_peft_alpha_pattern_and_rslora(model, tmp_path):
    folder, _ = write_tiny_lora(tmp_path / "peft", keys="peft", alpha=8.0, rank=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"proj_out": 2.0}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    scales = {p.target.module: p.scale for p in load_lora(folder, model).patches}
    assert scales["proj_out"] == 0.5 and scales["clip_projection"] == 2.0
    config["use_rslora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    scales = {p.target.module: p.scale for p in load_lora(folder, model).patches}
    assert scales["clip_projection"] == pytest.approx(8.0 / 2.0)  # lora_alpha / sqrt(r)


def test_diff_and_bias_diff_on_weights_norms_and_tables(model, tmp_path):
    gen = torch.Generator().manual_seed(3)
    sd = model.state_dict()
    diffs = {
        "diffusion_model.proj_out.diff": torch.randn(sd["proj_out.weight"].shape, generator=gen) * 0.01,
        "diffusion_model.proj_out.diff_b": torch.randn(sd["proj_out.bias"].shape, generator=gen) * 0.01,
        "diffusion_model.transformer_blocks.1.norm2.diff": torch.randn(256, generator=gen) * 0.01,
        "diffusion_model.transformer_blocks.1.norm2.diff_b": torch.randn(256, generator=gen) * 0.01,
        "diffusion_model.transformer_blocks.0.scale_shift_table.diff": torch.randn(6, 256, generator=gen) * 0.01,
        "diffusion_model.transformer_blocks.0.attn1.to_v.diff": torch.randn(256, 256, generator=gen) * 0.01,
        "diffusion_model.transformer_blocks.0.ff.net.2.diff_b": torch.randn(256, generator=gen) * 0.01,
    }
    save_file(diffs, str(tmp_path / "d.safetensors"))
    adapter = load_lora(tmp_path / "d.safetensors", model)
    assert adapter.unmatched == () and "differences" in adapter.format
    got = merged_state(model, adapter)
    torch.testing.assert_close(got["proj_out.weight"], sd["proj_out.weight"] + diffs["diffusion_model.proj_out.diff"])
    torch.testing.assert_close(got["proj_out.bias"], sd["proj_out.bias"] + diffs["diffusion_model.proj_out.diff_b"])
    torch.testing.assert_close(got["transformer_blocks.1.norm2.bias"],
                               sd["transformer_blocks.1.norm2.bias"] + diffs["diffusion_model.transformer_blocks.1.norm2.diff_b"])
    torch.testing.assert_close(got["transformer_blocks.0.scale_shift_table"],
                               sd["transformer_blocks.0.scale_shift_table"]
                               + diffs["diffusion_model.transformer_blocks.0.scale_shift_table.diff"])
    v_rows = got["transformer_blocks.0.attn1.wqkv.weight"].view(2, 3, 128, 256)[:, 2].reshape(256, 256)
    base_v = sd["transformer_blocks.0.attn1.wqkv.weight"].view(2, 3, 128, 256)[:, 2].reshape(256, 256)
    torch.testing.assert_close(v_rows, base_v + diffs["diffusion_model.transformer_blocks.0.attn1.to_v.diff"])


def test_kohya_underscore_names_resolve_against_real_module_names(model, tmp_path):
    # names that naive "_" -> "." replacement gets wrong: adaln_single, linear_1, to_out.0, net.0.proj, attn_2
    state, _ = tiny_lora(keys="kohya", style="w", alpha=4.0)
    assert "lora_unet_adaln_single_emb_timestep_embedder_linear_1.lora_down.weight" in state
    assert "lora_unet_transformer_blocks_1_attn_2_wk.lora_up.weight" in state
    save_file(state, str(tmp_path / "k.safetensors"))
    adapter = load_lora(tmp_path / "k.safetensors", model)
    assert adapter.unmatched == ()
    modules = {p.target.module for p in adapter.patches}
    assert {"adaln_single.emb.timestep_embedder.linear_1", "transformer_blocks.1.attn2.wkv",
            "transformer_blocks.0.ff.net.0.proj"} <= modules


def test_partly_matching_adapter_reports_what_was_left(model, tmp_path):
    state, truth = tiny_lora(keys="comfy")
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    state["transformer_blocks.7.attn1.wo.lora_down.weight"] = torch.zeros(4, 256)
    state["transformer_blocks.0.attn1.wo.hada_w1_a"] = torch.zeros(4, 4)
    state["proj_out.lora_up.weight_extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "p.safetensors"))
    adapter = load_lora(tmp_path / "p.safetensors", model)
    assert len(adapter.patches) == len(truth)
    reasons = dict(adapter.unmatched)
    assert "text-encoder" in reasons["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert "block 7 does not exist" in reasons["transformer_blocks.7.attn1.wo.lora_down.weight"]
    assert "LoHa" in reasons["transformer_blocks.0.attn1.wo.hada_w1_a"]
    report = adapter.report()
    assert f"{len(adapter.matched)} of {len(state)} tensors matched" in report and "NOT matched" in report


def test_another_models_adapter_fails_clearly(model, tmp_path):
    # Hunyuan-style keys: nothing to match
    foreign = {f"transformer.double_blocks.{i}.img_attn_qkv.lora_A.weight": torch.zeros(4, 3072) for i in range(3)}
    foreign.update({f"transformer.double_blocks.{i}.img_attn_qkv.lora_B.weight": torch.zeros(9216, 4)
                    for i in range(3)})
    save_file(foreign, str(tmp_path / "hunyuan.safetensors"))
    with pytest.raises(LoraError, match=r"matched none of its 6 tensors.*PEFT/diffusers.*double_blocks"):
        load_lora(tmp_path / "hunyuan.safetensors", model)


def test_same_names_other_width_name_key_and_both_shapes(model, tmp_path):
    # Wan-style names exist here too (blocks.N.self_attn.q); the widths do not fit
    wan = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
           "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)}
    save_file(wan, str(tmp_path / "wan.safetensors"))
    with pytest.raises(LoraError) as info:
        load_lora(tmp_path / "wan.safetensors", model)
    message = str(info.value)
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in message
    assert "[4, 5120]" in message and "[4, 256]" in message and "q rows" in message


def test_pickles_and_dora_are_refused(model, tmp_path):
    torch.save({"a.lora_A.weight": torch.zeros(1)}, tmp_path / "evil.pt")
    with pytest.raises(LoraError, match="only .safetensors adapters"):
        load_lora(tmp_path / "evil.pt", model)
    folder = tmp_path / "peft_bin"
    folder.mkdir()
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(LoraError, match="pickled"):
        load_lora(folder, model)
    state, _ = tiny_lora(keys="peft")
    state["proj_out.lora_magnitude_vector"] = torch.ones(64)
    save_file(state, str(tmp_path / "dora.safetensors"))
    with pytest.raises(LoraError, match="DoRA"):
        read_adapter(tmp_path / "dora.safetensors")


def test_half_pairs_are_reported_not_applied(model, tmp_path):
    state, _ = tiny_lora(keys="peft")
    del state["proj_out.lora_B.weight"]
    save_file(state, str(tmp_path / "h.safetensors"))
    adapter = load_lora(tmp_path / "h.safetensors", model)
    assert dict(adapter.unmatched)["proj_out.lora_A.weight"].startswith("only the down")
    assert "proj_out" not in {p.target.module for p in adapter.patches}


def test_an_empty_rank_0_pair_is_refused_not_divided_by(model, tmp_path):
    empty = {"proj_out.lora_down.weight": torch.zeros(0, 256), "proj_out.lora_up.weight": torch.zeros(64, 0),
             "proj_out.alpha": torch.tensor(4.0)}
    save_file(empty, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(LoraError, match="proj_out.lora_down.weight: rank 0"):
        load_lora(tmp_path / "rank0.safetensors", model)
