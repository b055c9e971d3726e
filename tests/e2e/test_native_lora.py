"""Step-Video LoRAs on ComfyUI's native MODEL, in-process against the real ComfyUI tree.

The MODEL here is a stand-in for the pack's native model: ComfyUI's own ``BaseModel`` (built with
``disable_unet_model_creation``) whose ``diffusion_model`` is the pack's tiny
:class:`StepVideoTransformer`, in a real ``ModelPatcher`` -- all the pack relies on.  Checked:

* ComfyUI's ``LoraLoaderModelOnly`` (the real node class) applies diffusers/PEFT, kohya/musubi,
  ComfyUI-style dotted and ``.diff`` adapters -- split q/k/v included -- exactly as the pack's own
  ``attached()`` path does (DiT outputs within 1e-5 in fp32, weights equal to a hand-computed
  reference), at any strength, merged or partially loaded ("lowvram");
* the key-map hook is a no-op for other models, idempotent, and harmless without its splitter;
* StepVideoLoraLoader takes the MODEL and gives a MODEL (ComfyUI patches on a clone);
* unmatched keys: what ComfyUI logs and what the pack's report says.

Needs COMFYUI_DIR and ComfyUI's requirements (see conftest.py); skipped without them (failed under CI=true).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core.cli import smoke_inputs
from stepvideo_core.tiny import TINY_DIT_CONFIG, tiny_dit_state_dict, tiny_lora, write_tiny_lora
from tests.core.lora.conftest import HEAD_DIM, expected_state, same, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
PREFIX = "diffusion_model."
# (file stem, tiny_lora arguments): the spellings users bring, split q/k/v wherever the style has them
FORMATS = {
    "diffusers_peft": dict(style="diffusers", keys="peft", prefix="transformer."),
    "peft_proj_names": dict(style="proj", keys="peft", prefix="base_model.model."),
    "kohya_split": dict(style="diffusers", keys="kohya", alpha=2.0),
    "musubi_proj_names": dict(style="proj", keys="kohya", alpha=8.0),
    "comfy_dotted_fused": dict(style="official", keys="comfy", prefix=PREFIX, alpha=3.0),
    "comfy_dotted_w_names": dict(style="w", keys="comfy"),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def comfy(comfyui_importable):
    """ComfyUI's modules (CPU), and its ``nodes.py`` loaded under another name (``nodes`` is the pack's folder)."""
    tree = str(comfyui_importable)
    if tree not in sys.path:
        sys.path.append(tree)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.lora
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.sd
    import comfy.supported_models_base
    import comfy.weight_adapter
    import folder_paths

    name = "comfyui_core_nodes_for_stepvideo_tests"
    core_nodes = sys.modules.get(name)
    if core_nodes is None:
        spec = importlib.util.spec_from_file_location(name, Path(tree) / "nodes.py")
        core_nodes = importlib.util.module_from_spec(spec)
        sys.modules[name] = core_nodes
        spec.loader.exec_module(core_nodes)
    return type("Comfy", (), dict(lora=comfy.lora, sd=comfy.sd, model_base=comfy.model_base,
                                  model_patcher=comfy.model_patcher, ops=comfy.ops,
                                  supported=comfy.supported_models_base, weight_adapter=comfy.weight_adapter,
                                  folder_paths=folder_paths, nodes=core_nodes))


def pack_module(pack, name):
    return sys.modules[f"{pack.__name__}.{name}"]


@pytest.fixture
def native(pack, comfy, monkeypatch):
    """The pack's nodes.native_lora with a fresh bridge cache and its hook installed (ComfyUI's originals
    are put back after the test, so every test starts from the same functions)."""
    bridge = pack_module(pack, "nodes.comfy_bridge")
    monkeypatch.setattr(bridge.modules, "_MODULES", {})
    monkeypatch.delenv(bridge.ENV_MODELS_DIR, raising=False)
    module = pack_module(pack, "nodes.native_lora")
    for name in ("model_lora_keys_unet", "load_lora"):
        monkeypatch.setattr(comfy.lora, name, original(getattr(comfy.lora, name)))
    assert module.install() and module.installed()
    return module


def original(function):
    """ComfyUI's own function under any wrappers."""
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


@pytest.fixture(scope="module")
def dit(pack, one_thread):
    """The tiny DiT (fp32, CPU) built from the pack's own classes, as the native model's diffusion model is."""
    model = pack_module(pack, "stepvideo_core.dit").build_transformer(TINY_DIT_CONFIG, device="meta",
                                                                      dtype=torch.float32)
    model.load_state_dict(tiny_dit_state_dict(seed=0), assign=True)
    return model.eval()


@pytest.fixture
def base_dit(dit):
    """The shared DiT, checked bit-identical to its checkpoint after the test (patches taken off again)."""
    snap = snapshot(dit)
    yield dit
    assert same(dit, snap), "the base weights changed"


def base_model(comfy, diffusion_model):
    """ComfyUI's BaseModel around ``diffusion_model`` (what the native MODEL's ``.model`` is)."""
    config = comfy.supported.BASE({"disable_unet_model_creation": True})
    model = comfy.model_base.BaseModel(config, device=CPU)
    model.diffusion_model = diffusion_model
    return model


def patcher(comfy, diffusion_model):
    return comfy.model_patcher.ModelPatcher(base_model(comfy, diffusion_model), load_device=CPU, offload_device=CPU)


@pytest.fixture
def model(comfy, base_dit):
    """A native Step-Video MODEL stand-in: a real ModelPatcher on a real BaseModel holding the tiny DiT."""
    return patcher(comfy, base_dit)


@pytest.fixture
def loras(comfy, tmp_path, monkeypatch):
    """models/loras for both ComfyUI's loaders and the pack's (through ComfyUI's folder_paths)."""
    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], comfy.folder_paths.supported_pt_extensions))
    return folder


@pytest.fixture(scope="module")
def inputs(dit):
    return smoke_inputs(dit)


def forward(dit, inputs):
    with torch.inference_mode():
        return dit(**inputs)


def core_lora(comfy, model, name, strength):
    """ComfyUI's LoraLoaderModelOnly, the real node."""
    (patched,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model=model, lora_name=name,
                                                                        strength_model=strength)
    return patched


def run_patched(model_patcher, dit, inputs, lowvram: int = 0):
    """(output, weights) of ``dit`` while ComfyUI has applied ``model_patcher``'s patches; patches removed after."""
    model_patcher.patch_model(device_to=CPU, lowvram_model_memory=lowvram)
    try:
        return forward(dit, inputs), snapshot(dit)
    finally:
        model_patcher.unpatch_model(device_to=CPU)


def pack_reference(pack, dit, path, strength, inputs):
    """(output, weights) of the pack's own path: its reader + ``attached()`` (merged), as StepVideoSampler runs it."""
    lora = pack_module(pack, "stepvideo_core.lora")
    entry = lora.LoraEntry(lora.load_lora(path, dit), strength, "merge")
    with lora.attached(dit, [entry]):
        return forward(dit, inputs), snapshot(dit)


def handle(pack, dit):
    types = pack_module(pack, "nodes.types")
    return types.StepVideoModelHandle(transformer=dit, dtype=torch.float32, device=CPU, offload_device=CPU,
                                      attention="sdpa", source=Path("tiny"))


def step_lora(pack, model, name, strength=1.0, mode="auto", blocks=""):
    out = pack_module(pack, "nodes.lora").StepVideoLoraLoader().load(model=model, lora_name=name, strength=strength,
                                                                      mode=mode, blocks=blocks)
    (result,) = out["result"]
    return result, out["ui"]["text"][0]


def max_error(weights, expected):
    return max((weights[k].float() - v).abs().max().item() for k, v in expected.items())


def diff_adapter():
    """A hand-made ``.diff``/``.diff_b`` adapter (mixed prefixes, split q/k/v included) and its expected state."""
    gen = torch.Generator().manual_seed(7)
    state = tiny_dit_state_dict(seed=0)
    expected = {k: v.clone() for k, v in state.items()}
    tensors = {}

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    def add(stored, target, delta, part=None):
        tensors[stored] = delta
        if part is None:
            expected[target] += delta
        else:
            index, parts = part
            rows, cols = expected[target].shape
            expected[target].view(rows // (parts * HEAD_DIM), parts, HEAD_DIM, cols)[:, index] += \
                delta.view(-1, HEAD_DIM, cols)

    add(PREFIX + "transformer_blocks.0.attn1.to_q.diff", "transformer_blocks.0.attn1.wqkv.weight", rand(256, 256),
        (0, 3))
    add("transformer_blocks.1.attn1.to_v.diff", "transformer_blocks.1.attn1.wqkv.weight", rand(256, 256), (2, 3))
    add("transformer.transformer_blocks.0.attn2.to_k.diff", "transformer_blocks.0.attn2.wkv.weight",
        rand(256, 256), (0, 2))
    add(PREFIX + "transformer_blocks.0.attn1.to_out.0.diff", "transformer_blocks.0.attn1.wo.weight", rand(256, 256))
    add(PREFIX + "proj_out.diff", "proj_out.weight", rand(64, 256))
    add(PREFIX + "proj_out.diff_b", "proj_out.bias", rand(64))
    add("transformer_blocks.1.norm1.diff", "transformer_blocks.1.norm1.weight", rand(256))
    add("transformer_blocks.1.norm1.diff_b", "transformer_blocks.1.norm1.bias", rand(256))
    return tensors, expected


def scaled_expected(expected, strength):
    """The hand-made expected state of :func:`diff_adapter` at ``strength`` (diffs are linear in it)."""
    state = tiny_dit_state_dict(seed=0)
    return {k: state[k] + strength * (v - state[k]) for k, v in expected.items()}


# --------------------------------------------------------------------------- core's LoraLoaderModelOnly = the pack


@pytest.mark.parametrize("strength", [1.0, -0.75])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_core_lora_loader_equals_the_packs_own_path(pack, comfy, native, model, base_dit, loras, inputs, fmt, strength):
    """Diffusers/PEFT, kohya/musubi and ComfyUI-style adapters (split q/k/v into the fused rows) through
    LoraLoaderModelOnly give the pack's outputs, and weights equal to a by-hand reference."""
    path, truth = write_tiny_lora(loras / f"{fmt}.safetensors", **FORMATS[fmt])
    plain = forward(base_dit, inputs)
    out, weights = run_patched(core_lora(comfy, model, path.name, strength), base_dit, inputs)
    ref, ref_weights = pack_reference(pack, base_dit, path, strength, inputs)

    assert max_error(weights, expected_state(tiny_dit_state_dict(seed=0), truth, strength)) <= 1e-6
    assert (ref - plain).abs().max() > 1e-2  # the adapter does something
    assert (out - ref).abs().max().item() <= 1e-5
    assert max_error(weights, {k: v.float() for k, v in ref_weights.items()}) <= 1e-6
    assert not model.patches  # the loader patched a clone


def test_diff_adapters_and_strength_scaling(pack, comfy, native, model, base_dit, loras, inputs):
    tensors, expected = diff_adapter()
    save_file(tensors, str(loras / "diff.safetensors"))
    for strength in (1.0, 0.5, -2.0):
        out, weights = run_patched(core_lora(comfy, model, "diff.safetensors", strength), base_dit, inputs)
        ref, _ = pack_reference(pack, base_dit, loras / "diff.safetensors", strength, inputs)
        assert max_error(weights, scaled_expected(expected, strength)) <= 1e-6, strength
        assert (out - ref).abs().max().item() <= 1e-5, strength


def test_modulation_tables_are_reported_not_silently_dropped(pack, comfy, native, model, base_dit, loras, inputs,
                                                             caplog):
    """ComfyUI's patcher never patches parameters of modules with sublayers (the scale_shift_table modulation
    tables): the hook leaves their names out so ComfyUI logs them as not loaded, and StepVideoLoraLoader on a MODEL
    says it did not apply them (ComfyUI's own generic ``diffusion_model.`` name is accepted and ignored by core)."""
    tables = {"transformer_blocks.1.scale_shift_table.diff": torch.ones(6, 256),
              PREFIX + "scale_shift_table.diff": torch.ones(2, 256),
              "proj_out.diff_b": torch.ones(64)}
    save_file(tables, str(loras / "tables.safetensors"))
    with caplog.at_level(logging.WARNING):
        patched = core_lora(comfy, model, "tables.safetensors", 1.0)
    assert "lora key not loaded: transformer_blocks.1.scale_shift_table.diff" in caplog.messages
    before = snapshot(base_dit)
    _, weights = run_patched(patched, base_dit, inputs)
    assert torch.equal(weights["scale_shift_table"], before["scale_shift_table"])  # ComfyUI: accepted, not applied
    assert torch.equal(weights["proj_out.bias"], before["proj_out.bias"] + 1)

    patched, text = step_lora(pack, model, "tables.safetensors")
    assert text.count("ComfyUI's ModelPatcher does not patch parameters of modules that have sublayers") == 2
    assert set(patched.patches) == {PREFIX + "proj_out.bias"}


def test_partial_loading_computes_the_same_patches_per_layer(pack, comfy, native, loras, inputs):
    """ComfyUI's lowvram path: weights stay untouched, each layer computes its patched weight on use
    (LowVramPatch -> the same per-head slices), and the output is the merged one."""
    core_ops = pack_module(pack, "stepvideo_core.ops")

    class castable(core_ops.plain):  # noqa: N801 - ComfyUI-castable layers, as the native model's are
        Linear = comfy.ops.disable_weight_init.Linear
        Conv2d = comfy.ops.disable_weight_init.Conv2d
        LayerNorm = comfy.ops.disable_weight_init.LayerNorm

    dit = pack_module(pack, "stepvideo_core.dit").build_transformer(TINY_DIT_CONFIG, device="meta",
                                                                    dtype=torch.float32, operations=castable)
    dit.load_state_dict(tiny_dit_state_dict(seed=0), assign=True)
    path, _ = write_tiny_lora(loras / "kohya.safetensors", style="diffusers", keys="kohya", alpha=2.0)
    patched = core_lora(comfy, patcher(comfy, dit), path.name, 0.8)
    snap = snapshot(dit)
    patched.patch_model(device_to=CPU, lowvram_model_memory=1)
    try:
        computed = [n for n, m in dit.named_modules() if getattr(m, "weight_function", None)]
        assert "transformer_blocks.0.attn1.wqkv" in computed and same(dit, snap)
        out = forward(dit, inputs)
    finally:
        patched.unpatch_model(device_to=CPU)
    assert same(dit, snap) and not any(getattr(m, "weight_function", None) for m in dit.modules())
    ref, _ = pack_reference(pack, dit, path, 0.8, inputs)
    assert (out - ref).abs().max().item() <= 1e-5


def test_split_qkv_becomes_one_slice_per_head_with_the_up_factor_cut(comfy, native, model, base_dit):
    """The patch format, spelled out: q of head h = rows [384h, 384h+128) of wqkv <- up[128h:128h+128] @ down."""
    state, _ = tiny_lora(style="diffusers", keys="kohya", alpha=2.0)
    loaded = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(model.model, {}))
    key = PREFIX + "transformer_blocks.0.attn1.wqkv.weight"
    sliced = sorted(k[1] for k in loaded if isinstance(k, tuple) and k[0] == key)
    assert sliced == [(0, 0, 128), (0, 128, 128), (0, 256, 128), (0, 384, 128), (0, 512, 128), (0, 640, 128)]
    stem = "lora_unet_transformer_blocks_0_attn1_to_k"
    up, down = state[stem + ".lora_up.weight"], state[stem + ".lora_down.weight"]
    for head, start in enumerate((128, 512)):  # k of head h: rows [384h + 128, 384h + 256)
        adapter = loaded[(key, (0, start, 128))]
        assert type(adapter) is comfy.weight_adapter.LoRAAdapter
        part_up, part_down, alpha = adapter.weights[:3]
        assert torch.equal(part_up, up[128 * head:128 * head + 128]) and part_down is down and alpha == 2.0
    wkv = PREFIX + "transformer_blocks.0.attn2.wkv.weight"
    cross = sorted(k[1] for k in loaded if isinstance(k, tuple) and k[0] == wkv)
    assert cross == [(0, 0, 128), (0, 128, 128), (0, 256, 128), (0, 384, 128)]  # wkv: [k_h | v_h] per head
    assert PREFIX + "transformer_blocks.0.attn2.wq.weight" in loaded  # cross-attention q is its own layer


def test_unmatched_keys_core_logs_them_and_the_pack_reports_them(pack, comfy, native, model, base_dit, loras, inputs,
                                                                 caplog):
    state, truth = tiny_lora(style="diffusers", keys="kohya", alpha=2.0)
    junk = {"lora_unet_transformer_blocks_7_attn1_to_q.lora_down.weight": torch.zeros(4, 256),   # no block 7
            "lora_unet_transformer_blocks_7_attn1_to_q.lora_up.weight": torch.zeros(256, 4),
            "transformer_blocks.0.attn1.to_qkv.lora_A.weight": torch.zeros(4, 256),            # stacked qkv: refused
            "transformer_blocks.0.attn1.to_qkv.lora_B.weight": torch.zeros(768, 4),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),  # a text encoder
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}
    save_file({**state, **junk}, str(loras / "junk.safetensors"))
    with caplog.at_level(logging.WARNING):
        patched = core_lora(comfy, model, "junk.safetensors", 1.0)
    core_missing = {r.getMessage()[len("lora key not loaded: "):] for r in caplog.records
                    if r.getMessage().startswith("lora key not loaded: ")}
    assert core_missing == set(junk)
    assert not [r for r in caplog.records if r.getMessage().startswith("NOT LOADED")]

    adapter = pack_module(pack, "stepvideo_core.lora").load_lora(loras / "junk.safetensors", base_dit)
    assert {k for k, _ in adapter.unmatched} == set(junk)
    report = adapter.report()
    assert f"{len(state)} of {len(state) + len(junk)} tensors matched" in report and "NOT matched:" in report
    assert "block 7 does not exist" in report and "text-encoder key" in report
    _, weights = run_patched(patched, base_dit, inputs)
    assert max_error(weights, expected_state(tiny_dit_state_dict(seed=0), truth, 1.0)) <= 1e-6


# --------------------------------------------------------------------------- the hook itself


def test_key_map_hook_is_a_noop_for_other_models_and_idempotent(comfy, native, model):
    other = base_model(comfy, torch.nn.Sequential(torch.nn.Linear(4, 4)))
    core_map = original(comfy.lora.model_lora_keys_unet)
    assert comfy.lora.model_lora_keys_unet(other, {}) == core_map(other, {})
    lora = {"diffusion_model.0.lora_up.weight": torch.ones(4, 1),
            "diffusion_model.0.lora_down.weight": torch.ones(1, 4)}
    key_map = core_map(other, {})
    loaded = comfy.lora.load_lora(lora, key_map)
    assert list(loaded) == ["diffusion_model.0.weight"] == list(original(comfy.lora.load_lora)(lora, key_map))

    functions = (comfy.lora.model_lora_keys_unet, comfy.lora.load_lora)
    first = comfy.lora.model_lora_keys_unet(model.model, {})
    assert native.install() and native.install()
    assert (comfy.lora.model_lora_keys_unet, comfy.lora.load_lora) == functions
    for function in functions:  # exactly one wrapper of ours on ComfyUI's function
        assert function.__wrapped__ is original(function)
    assert comfy.lora.model_lora_keys_unet(model.model, {}) == first


def test_key_map_only_adds_and_names_real_tensors(comfy, native, model):
    ours = comfy.lora.model_lora_keys_unet(model.model, {})
    core = original(comfy.lora.model_lora_keys_unet)(model.model, {})
    assert all(ours[k] == v for k, v in core.items()) and len(ours) > len(core)
    state = set(model.model.state_dict())
    for name, value in ours.items():
        assert (value if isinstance(value, str) else value[0]) in state, name
    wo = PREFIX + "transformer_blocks.0.attn1.wo.weight"
    assert ours["transformer.transformer_blocks.0.attn1.to_out.0"] == wo
    assert ours["lora_unet_blocks_0_self_attn_o_proj"] == wo and ours["base_model.model.blocks.0.attn.wo"] == wo
    assert ours["transformer_blocks.1.attn2.to_q"] == PREFIX + "transformer_blocks.1.attn2.wq.weight"
    q = ours["lora_transformer_transformer_blocks_0_attn1_to_q"]
    assert q[0] == PREFIX + "transformer_blocks.0.attn1.wqkv.weight" and q[2].slot.name == "q"
    assert "transformer_blocks.0.attn1.to_qkv" not in ours  # stacked q|k|v is not our layout: never mapped


def test_a_split_qkv_patch_that_cannot_be_cut_per_head_is_dropped_with_a_warning(comfy, native, model, base_dit,
                                                                                 inputs, caplog):
    """DoRA renormalises the whole weight, so its q part is not a row slice: not applied, and said so."""
    stem = "lora_unet_transformer_blocks_0_attn1_to_q"
    state = {f"{stem}.lora_down.weight": torch.ones(4, 256), f"{stem}.lora_up.weight": torch.ones(256, 4),
             f"{stem}.dora_scale": torch.ones(256, 1)}
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert loaded == {}
    assert any("for the q rows of diffusion_model.transformer_blocks.0.attn1.wqkv.weight cannot be split" in m
               for m in caplog.messages)


def test_without_the_splitter_a_split_qkv_patch_changes_nothing(comfy, native, model, base_dit, inputs, caplog):
    """Another loader using the key map with ComfyUI's own load_lora: the unsplit q/k/v patches are refused by
    ComfyUI (logged), the whole-layer patches still apply -- never a silently wrong update."""
    state, _ = tiny_lora(style="diffusers", keys="kohya", alpha=2.0)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = original(comfy.lora.load_lora)(state, key_map)
    clone = model.clone()
    clone.add_patches(loaded, 1.0)
    before = snapshot(base_dit)
    with caplog.at_level(logging.ERROR):
        _, weights = run_patched(clone, base_dit, inputs)
    wqkv, wo = "transformer_blocks.0.attn1.wqkv.weight", "transformer_blocks.0.attn1.wo.weight"
    assert torch.equal(weights[wqkv], before[wqkv]) and not torch.equal(weights[wo], before[wo])
    assert any("transformer_blocks.0.attn1.wqkv.weight" in r.getMessage() for r in caplog.records)


def test_pack_import_installs_the_hook_only_inside_comfyui(pack, comfy, native, monkeypatch):
    """Importing nodes/lora.py runs ``install_if_loaded()``: the hook when ComfyUI has imported comfy.lora
    (it always has before loading packs), nothing -- and no ComfyUI import -- otherwise."""
    for name in ("model_lora_keys_unet", "load_lora"):
        monkeypatch.setattr(comfy.lora, name, original(getattr(comfy.lora, name)))
    assert not native.installed()
    monkeypatch.delitem(sys.modules, "comfy.lora")
    assert native.install_if_loaded() is False and "comfy.lora" not in sys.modules
    monkeypatch.setitem(sys.modules, "comfy.lora", comfy.lora)
    assert native.install_if_loaded() is True and native.installed()


def test_without_comfyui_nothing_is_installed(pack, comfy, native, model, monkeypatch):
    bridge = pack_module(pack, "nodes.comfy_bridge")
    for name in ("comfy.lora", "comfy.weight_adapter"):
        monkeypatch.setitem(bridge._MODULES, name, None)
    assert native.install() is False and native.installed() is False
    assert not native.is_native_model(handle(pack, None)) and native.is_native_model(model)
    with pytest.raises(ValueError, match="needs ComfyUI's comfy.weight_adapter"):
        native.apply_to_model(model, None)


# --------------------------------------------------------------------------- StepVideoLoraLoader on a MODEL


def test_step_lora_loader_takes_a_model_and_gives_a_model(pack, comfy, native, model, base_dit, loras, inputs):
    path, truth = write_tiny_lora(loras / "kohya.safetensors", style="diffusers", keys="kohya", alpha=2.0)
    patched, text = step_lora(pack, model, path.name, strength=0.6)
    assert isinstance(patched, comfy.model_patcher.ModelPatcher) and patched is not model and not model.patches
    assert "kohya/musubi" in text and "strength 0.6, as 35 ComfyUI weight patches on 19 tensors" in text
    assert "(20 of them per-head row slices for split q/k/v)" in text and "NOT" not in text
    out, weights = run_patched(patched, base_dit, inputs)
    core_out, _ = run_patched(core_lora(comfy, model, path.name, 0.6), base_dit, inputs)
    ref, _ = pack_reference(pack, base_dit, path, 0.6, inputs)
    assert max_error(weights, expected_state(tiny_dit_state_dict(seed=0), truth, 0.6)) <= 1e-6
    assert (out - ref).abs().max().item() <= 1e-5 and (out - core_out).abs().max().item() <= 1e-6

    stacked, _ = step_lora(pack, core_lora(comfy, model, path.name, 0.5), path.name, strength=0.1)  # chains with core's
    _, weights = run_patched(stacked, base_dit, inputs)
    assert max_error(weights, expected_state(tiny_dit_state_dict(seed=0), truth, 0.6)) <= 1e-6


def test_step_lora_loader_on_a_model_keeps_its_own_rules(pack, comfy, native, model, base_dit, loras, inputs):
    """The pack's reader decides: PEFT folders' lora_alpha (which ComfyUI's loader cannot see), the block filter,
    and a bias difference on a layer without a bias parameter is reported, not dropped silently."""
    path, truth = write_tiny_lora(loras / "peft", style="proj", keys="peft", alpha=8.0, prefix="transformer.")
    name = "peft/adapter_model.safetensors"
    patched, _ = step_lora(pack, model, name, blocks="1")
    _, weights = run_patched(patched, base_dit, inputs)
    block1 = [t for t in truth if t["module"].startswith("transformer_blocks.1.")]
    assert {t["scale"] for t in truth} == {2.0}  # lora_alpha 8 / r 4
    assert max_error(weights, expected_state(tiny_dit_state_dict(seed=0), block1, 1.0)) <= 1e-6
    _, core_weights = run_patched(core_lora(comfy, model, name, 1.0), base_dit, inputs)
    assert max_error(core_weights, expected_state(tiny_dit_state_dict(seed=0), truth, 0.5)) <= 1e-6  # alpha unseen

    save_file({"transformer_blocks.0.attn1.to_q.diff_b": torch.ones(256), "proj_out.diff_b": torch.ones(64)},
              str(loras / "bias.safetensors"))
    patched, text = step_lora(pack, model, "bias.safetensors", mode="merge")
    assert "NOT applied: transformer_blocks.0.attn1.to_q.diff_b (transformer_blocks.0.attn1.wqkv has no bias" in text
    assert "mode merge does not apply to a ComfyUI MODEL" in text
    assert set(patched.patches) == {PREFIX + "proj_out.bias"}


def test_step_lora_loader_on_a_model_applies_two_names_for_one_layer(pack, comfy, native, model, base_dit, loras,
                                                                       inputs):
    """Two spellings of one layer in one file are two updates for the pack (and on a MODEL: two add_patches calls);
    ComfyUI's own loader keys its patches by weight, so only one of them survives there."""
    gen = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, 4, 256, generator=gen), torch.randn(2, 256, 4, generator=gen) * 0.05
    save_file({"transformer_blocks.0.attn1.to_out.0.lora_A.weight": down[0],
               "transformer_blocks.0.attn1.to_out.0.lora_B.weight": up[0],
               "blocks.0.self_attn.o_proj.lora_A.weight": down[1], "blocks.0.self_attn.o_proj.lora_B.weight": up[1]},
              str(loras / "twice.safetensors"))
    key = "transformer_blocks.0.attn1.wo.weight"
    expected = tiny_dit_state_dict(seed=0)[key] + up[0] @ down[0] + up[1] @ down[1]
    patched, _ = step_lora(pack, model, "twice.safetensors")
    assert len(patched.patches[PREFIX + key]) == 2
    _, weights = run_patched(patched, base_dit, inputs)
    assert (weights[key] - expected).abs().max() <= 1e-6
    assert len(core_lora(comfy, model, "twice.safetensors", 1.0).patches[PREFIX + key]) == 1


def test_step_lora_loader_refuses_other_models(pack, comfy, native, loras):
    write_tiny_lora(loras / "kohya.safetensors", style="diffusers", keys="kohya")
    other = comfy.model_patcher.ModelPatcher(base_model(comfy, torch.nn.Linear(2, 2)), CPU, CPU)
    with pytest.raises(ValueError, match="not a Step-Video model .its diffusion model is Linear"):
        step_lora(pack, other, "kohya.safetensors")


def test_step_lora_loader_socket_takes_both_kinds(pack, comfy):
    """ComfyUI's own validation accepts the union socket from, and into, both kinds of model socket."""
    from comfy_execution.validation import validate_node_input

    cls = pack.NODE_CLASS_MAPPINGS["StepVideoLoraLoader"]
    (socket,) = cls.RETURN_TYPES
    assert cls.INPUT_TYPES()["required"]["model"][0] == socket == "STEPVIDEO_MODEL,MODEL"
    for kind in ("STEPVIDEO_MODEL", "MODEL"):
        assert validate_node_input(kind, socket) and validate_node_input(socket, kind)
    assert not validate_node_input("CLIP", socket)
