"""The native model family against the real ComfyUI modules (in-process, CPU): latent format, model
config, BaseModel conds and memory, the diffusion model's contract (checkpoint names, layout, sign,
timestep, wrappers, block patches), ComfyUI's partial loading and model management, fp8 weights.

Needs COMFYUI_DIR (see tests/e2e/conftest.py); skipped without it, failed under CI=true.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_native_support import CallCounter, core_dit, native_dit, prompts, rel
from tests.e2e.test_native_support import cnodes, comfy, nat  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def patcher(nat):
    return nat.model.make_patcher(native_dit(nat))


def apply(patcher, nat, x, sigma, cond):
    """One ``BaseModel.apply_model`` call (what the samplers make), denoised [B, C, F, h, w]."""
    (states, extras), = nat.model.native_conditioning(cond)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.full((x.shape[0],), sigma), c_crossattn=states,
                                         encoder_hidden_states_2=extras[nat.model.CLIP_KEY],
                                         encoder_attention_mask=extras[nat.model.MASK_KEY])


# --------------------------------------------------------------------------- latent format and config


def test_latent_format_is_the_video_vae_v2(nat, comfy):
    import comfy.sample

    fmt = nat.model.StepVideoLatentFormat()
    assert (fmt.latent_channels, fmt.latent_dimensions, fmt.spacial_downscale_ratio) == (64, 3, 16)
    assert fmt.temporal_downscale_ratio == 17 / 3 and fmt.scale_factor == 1.0
    latent = torch.randn(1, 64, 3, 2, 2)
    assert torch.equal(fmt.process_in(latent), latent) and torch.equal(fmt.process_out(latent), latent)

    # what ComfyUI uses the ratio for: an empty latent sized at another temporal ratio is re-counted;
    # 102 video frames are 18 latent frames (6 chunks of 17 -> 3)
    patcher = nat.model.make_patcher(native_dit(nat))
    pixel_frames = torch.zeros(1, 64, 102, 3, 2)
    fixed = comfy.sample.fix_empty_latent_channels(patcher, pixel_frames, None, 1)
    assert fixed.shape == (1, 64, 18, 3, 2)


def test_latent_channels_follow_the_model(nat, comfy):
    """64 for the release; a DiT with other latent channels (the tiny release's 8) gets its own count, and
    ComfyUI re-counts an empty 64-channel StepVideo latent for it (what KSampler does before sampling)."""
    import comfy.sample

    assert nat.model.make_patcher(native_dit(nat)).model.latent_format.latent_channels == 64
    small = nat.model.make_patcher(native_dit(nat, config=nat.tiny.TINY_RELEASE_DIT_CONFIG))
    assert small.model.latent_format.latent_channels == 8
    (empty,) = nat.nodes.StepVideoEmptyLatent().generate(width=32, height=48, frames=17, batch_size=1)
    assert comfy.sample.fix_empty_latent_channels(small, empty["samples"]).shape == (1, 8, 3, 3, 2)


@pytest.mark.parametrize("method", ["none", "auto", "latent2rgb", "taesd"])
def test_native_previews_are_progress_only_for_every_preview_method(nat, cnodes, patcher, method, monkeypatch):
    """The latent format has no latent->RGB factors and no TAESD decoder (the pack ships no map: a fit for the
    random-init tiny VAE would mean nothing for the real one), so for every ComfyUI preview method its samplers
    find no previewer and their step callback reports progress with no image -- never a grey or wrong one."""
    import sys

    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    latent_preview = sys.modules["latent_preview"]  # imported by ComfyUI's nodes (the cnodes fixture)
    fmt = nat.model.StepVideoLatentFormat()
    assert (fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias, fmt.taesd_decoder_name) == (None, None, None)
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod(method))
    assert latent_preview.get_previewer(torch.device("cpu"), fmt) is None
    sent = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        sent.append((value, total, preview)))
    callback = latent_preview.prepare_callback(patcher, 2)
    x0 = torch.randn(1, 64, 3, 2, 2)
    for step in range(2):
        callback(step, x0, x0, 2)
    assert sent == [(1, 2, None), (2, 2, None)]


def test_model_sampling_is_flow_with_shift_13_and_multiplier_1(patcher, comfy):
    import comfy.model_sampling

    sampling = patcher.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.CONST)
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert sampling.shift == 13.0 and sampling.multiplier == 1.0
    assert float(sampling.sigma_max) == 1.0
    assert float(sampling.timestep(torch.tensor(0.25))) == 0.25


def test_memory_factor_and_memory_required_follow_the_pack_planner(nat, patcher):
    from stepvideo_core.offload.planner import PEAK_UNITS, PlanInputs, host_activation_bytes

    model = patcher.model
    assert model.memory_usage_factor == pytest.approx(PEAK_UNITS[2] * 256 / (0.01 * 2 ** 20))
    full = nat.model.StepVideoT2VConfig(nat.core.StepVideoDiTConfig())
    assert full.memory_usage_factor == pytest.approx(9.5 * 6144 / 10485.76)
    for shape, frames in (([2, 64, 3, 34, 62], 17), ([1, 64, 18, 34, 62], 102), ([2, 64, 16, 34, 62], 102)):
        assert model.memory_required(shape) == host_activation_bytes(PlanInputs(
            992, 544, frames, cfg_batch=shape[0], weight_format="fp32", attention="sdpa", compute_dtype="fp32",
            config=model.diffusion_model.config.to_dict()))
    # and the planner's peak-unit term is what ComfyUI's own formula gives with that factor (bf16)
    tokens, batch = 18 * 34 * 62, 2
    comfy_formula = batch * tokens * 2 * 0.01 * full.memory_usage_factor * 2 ** 20
    assert comfy_formula == pytest.approx(PEAK_UNITS[2] * batch * tokens * 6144 * 2)


# --------------------------------------------------------------------------- the diffusion model


def test_diffusion_model_is_the_pack_transformer_with_checkpoint_names(nat, patcher):
    dit = patcher.model.diffusion_model
    assert isinstance(dit, nat.core.StepVideoTransformer)
    config, sd = nat.tiny.TINY_DIT_CONFIG, nat.tiny.tiny_dit_state_dict()
    keys = {k for k in patcher.model.state_dict() if k != "model_sampling.sigmas"}  # every BaseModel has that one
    assert keys == {f"diffusion_model.{k}" for k in sd}
    assert "diffusion_model.transformer_blocks.0.attn1.wqkv.weight" in keys
    assert nat.model.is_stepvideo_patcher(patcher)
    assert patcher.model.get_dtype() == torch.float32 and config["num_layers"] == len(dit.transformer_blocks)


def test_output_is_minus_the_velocity_in_comfy_layout_at_one_minus_sigma(nat, patcher):
    """denoised = x - out*sigma_c with out = -v(x, 1 - sigma_c): the official velocity, ComfyUI's layout."""
    pos, _ = prompts()
    x = torch.randn(1, 64, 3, 3, 2, generator=torch.Generator().manual_seed(5))
    sigma = 0.75
    denoised = apply(patcher, nat, x, sigma, pos)
    ref = core_dit(nat)
    keys = ("encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")
    with torch.no_grad():
        v = ref(x.movedim(1, 2), torch.tensor([1 - sigma]), **{k: pos[k] for k in keys}).movedim(2, 1)
    assert rel(denoised, x + v * sigma) <= 1e-6


def test_diffusion_model_runs_through_the_diffusion_model_wrappers(nat, patcher, comfy):
    """What EasyCache relies on: a DIFFUSION_MODEL wrapper sees ComfyUI's layout and owns the result."""
    seen = []

    def wrapper(executor, *args, **kwargs):
        options = args[-1] if isinstance(args[-1], dict) else kwargs["transformer_options"]
        seen.append((tuple(args[0].shape), options.get("marker")))
        return executor(*args, **kwargs) * 0

    patched = patcher.clone()
    patched.add_wrapper_with_key(comfy.ext.WrappersMP.DIFFUSION_MODEL, "test", wrapper)
    pos, _ = prompts()
    x = torch.randn(1, 64, 3, 3, 2)
    (states, extras), = nat.model.native_conditioning(pos)
    with torch.no_grad():
        out = patched.model.apply_model(x, torch.tensor([0.5]), c_crossattn=states,
                                        transformer_options={"wrappers": patched.wrappers, "marker": 7},
                                        encoder_hidden_states_2=extras[nat.model.CLIP_KEY],
                                        encoder_attention_mask=extras[nat.model.MASK_KEY])
    assert seen == [((1, 64, 3, 3, 2), 7)]  # ComfyUI's layout: 64 = latent_format.latent_channels
    assert torch.equal(out, x)  # denoised = x - 0 * sigma: the wrapper's result is what came out


def test_block_replace_patches_are_honoured(nat, patcher):
    calls = []

    def replace(args, extra):
        calls.append((args["transformer_options"]["block_index"], args["transformer_options"]["total_blocks"]))
        out = extra["original_block"](args)
        return {"img": out["img"] * 0 if args["transformer_options"]["block_index"] == 1 else out["img"]}

    pos, _ = prompts()
    x = torch.randn(1, 64, 3, 3, 2)
    plain = apply(patcher, nat, x, 0.5, pos)
    patched = patcher.clone()
    patched.set_model_patch_replace(replace, "dit", "double_block", 1)
    options = patched.model_options["transformer_options"]
    (states, extras), = nat.model.native_conditioning(pos)
    with torch.no_grad():
        out = patched.model.apply_model(x, torch.tensor([0.5]), c_crossattn=states, transformer_options=options,
                                        encoder_hidden_states_2=extras[nat.model.CLIP_KEY],
                                        encoder_attention_mask=extras[nat.model.MASK_KEY])
    assert calls == [(1, 2)]
    assert not torch.equal(out, plain)


def test_mask_counts_are_summed_in_the_compute_dtype_like_the_official_pipeline(nat):
    """The official pipeline casts the mask to bf16 before the DiT sums it: 377 valid tokens count as
    376 in bf16.  The native model receives the text encoder's int64 mask and must do the same."""
    patcher = nat.model.make_patcher(native_dit(nat, torch.bfloat16))
    gen = torch.Generator().manual_seed(3)
    cond = {"encoder_hidden_states": torch.randn(1, 320, 96, generator=gen),
            "encoder_hidden_states_2": torch.randn(1, 77, 48, generator=gen),
            "encoder_attention_mask": torch.cat([torch.ones(1, 377), torch.zeros(1, 20)], 1).long()}
    assert int(cond["encoder_attention_mask"].to(torch.bfloat16).sum()) == 376
    x = torch.randn(1, 64, 3, 3, 2, generator=gen)
    denoised = apply(patcher, nat, x, 0.6, cond)
    dit = core_dit(nat, torch.bfloat16)
    with torch.no_grad():
        v = dit(x.movedim(1, 2).to(torch.bfloat16), torch.tensor([1 - 0.6]).to(torch.bfloat16),
                **{k: t.to(torch.bfloat16) for k, t in cond.items()}).movedim(2, 1)
    assert torch.equal(denoised, x + v.float() * 0.6)


def test_wrong_conditioning_fails_with_a_clear_message(nat, patcher):
    x = torch.randn(1, 64, 3, 3, 2)
    with pytest.raises(ValueError, match="StepVideo Native Text Encode"):
        with torch.no_grad():
            patcher.model.apply_model(x, torch.tensor([0.5]), c_crossattn=torch.randn(1, 77, 4096))


# --------------------------------------------------------------------------- conds


def test_conds_have_the_kinds_batching_and_cfg_need(nat, patcher, comfy):
    import comfy.conds

    pos, neg = prompts()
    (states, extras), = nat.model.native_conditioning(pos)
    out = patcher.model.extra_conds(cross_attn=states, **extras)
    assert isinstance(out["c_crossattn"], comfy.conds.CONDCrossAttn)
    assert type(out["encoder_hidden_states_2"]) is comfy.conds.CONDRegular
    assert type(out["encoder_attention_mask"]) is comfy.conds.CONDRegular
    batched = out["encoder_attention_mask"].process_cond(batch_size=3, area=None)
    assert batched.cond.shape == (3, 83)
    (n_states, n_extras), = nat.model.native_conditioning(neg)
    other = patcher.model.extra_conds(cross_attn=n_states, **n_extras)
    assert all(out[k].can_concat(other[k]) for k in out)  # same token counts: one batched CFG call
    short = patcher.model.extra_conds(cross_attn=n_states[:, :3], **dict(n_extras, attention_mask=n_extras[
        nat.model.MASK_KEY][:, :80]))
    assert not out["encoder_attention_mask"].can_concat(short["encoder_attention_mask"])


def test_timestep_is_normalised_by_the_sampling_multiplier(patcher, comfy):
    import comfy.model_sampling

    t = torch.tensor([0.3, 0.7])
    assert torch.equal(patcher.model.process_timestep(t), t)
    patched = patcher.clone()

    class Sampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = Sampling(patcher.model.model_config)
    sampling.set_parameters(shift=13.0, multiplier=1000)
    patched.add_object_patch("model_sampling", sampling)
    patched.patch_model()
    try:
        assert torch.allclose(patched.model.process_timestep(sampling.timestep(t)), t, rtol=0, atol=1e-7)
    finally:
        patched.unpatch_model()


# --------------------------------------------------------------------------- ComfyUI memory management


def test_every_weight_holding_layer_is_castable(nat):
    for dit in (native_dit(nat), native_dit(nat, ops=nat.model.native_fp8_ops)):
        assert nat.model.castable_problems(dit) == []
    plain = core_dit(nat)
    assert "transformer_blocks.0.attn1.q_norm" in nat.model.castable_problems(plain)


def test_partial_loading_casts_layers_and_gives_the_same_result(nat, patcher, comfy, monkeypatch):
    """ComfyUI's lowvram path: with a small budget layers stay at the offload device and are cast per call."""
    pos, _ = prompts()
    x = torch.randn(1, 64, 3, 3, 2, generator=torch.Generator().manual_seed(2))
    full = apply(patcher, nat, x, 0.6, pos)
    casts = []
    real = comfy.ops.cast_bias_weight
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", lambda s, *a, **k: casts.append(type(s).__name__) or real(s, *a, **k))
    low = patcher.clone()
    low.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=100_000)
    try:
        assert low.model.model_lowvram
        assert low.model.model_loaded_weight_memory < 100_000
        partial = apply(low, nat, x, 0.6, pos)
    finally:
        low.unpatch_model(torch.device("cpu"))
    assert {"NativeLinear", "NativeRMSNorm", "Conv2d"} <= set(casts)
    assert casts.count("NativeLinear") >= 2 * 7  # every block Linear of both blocks went through a cast
    assert torch.equal(partial, full)
    assert not any(getattr(m, "comfy_cast_weights", False) for m in patcher.model.modules())


def test_load_models_gpu_and_free_memory_manage_the_model(nat, patcher, comfy):
    mm = comfy.mm
    assert patcher.load_device == mm.get_torch_device() and patcher.offload_device == mm.unet_offload_device()
    mm.load_models_gpu([patcher])
    assert patcher in mm.loaded_models()
    assert patcher.loaded_size() == patcher.model_size() > 0
    mm.free_memory(1e30, patcher.load_device)
    assert patcher not in mm.loaded_models()
    mm.load_models_gpu([patcher])
    mm.unload_all_models()
    assert patcher not in mm.loaded_models()


# --------------------------------------------------------------------------- fp8 weights


@pytest.fixture
def fp8_patcher(nat, tmp_path):
    path = nat.tiny.write_tiny_dit(tmp_path / "dit")
    dit = nat.model.load_diffusion_model(path, torch.float32, "fp8_scaled", "sdpa", device="cpu")
    return nat.model.make_patcher(dit), path


def test_fp8_weights_carry_over_and_partial_loading_keeps_their_arithmetic(nat, fp8_patcher):
    patcher, path = fp8_patcher
    dit = patcher.model.diffusion_model
    layer = dit.transformer_blocks[0].attn1.wqkv
    assert isinstance(layer, nat.model.NativeFp8Linear) and layer.is_fp8 and dit.weight_format == "fp8_scaled"
    plain = nat.core.load_transformer(path, dtype=torch.float32, weight_format="fp8_scaled")
    assert torch.equal(plain.transformer_blocks[0].attn1.wqkv.weight, layer.weight)

    pos, _ = prompts()
    x = torch.randn(1, 64, 3, 3, 2, generator=torch.Generator().manual_seed(4))
    full = apply(patcher, nat, x, 0.4, pos)
    keys = ("encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")
    with torch.no_grad():
        v = plain(x.movedim(1, 2), torch.tensor([0.6]), **{k: pos[k] for k in keys}).movedim(2, 1)
    assert rel(full, x + v * 0.4) <= 1e-6
    products = []
    real = nat.model.NativeFp8Linear.fp8_linear
    low = patcher.clone()
    low.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=50_000)
    try:
        assert layer.comfy_cast_weights
        nat.model.NativeFp8Linear.fp8_linear = lambda self, *a: products.append(self.comfy_cast_weights) or real(self, *a)
        partial = apply(low, nat, x, 0.4, pos)
    finally:
        nat.model.NativeFp8Linear.fp8_linear = real
        low.unpatch_model(torch.device("cpu"))
    assert torch.equal(partial, full)
    # cast layers still multiply with the pack's fp8 product (fp8 matmul where the kernel exists), every one
    assert len(products) == 2 * 7 and sum(products) >= 10


def test_weight_patches_on_fp8_layers_apply_to_the_dequantised_weight(nat, fp8_patcher, comfy):
    """ComfyUI's add_patches (what LoRA loaders end with) on an fp8 weight: the patch is added to
    weight*scale, stored back in fp8 with the same scales, and unpatching restores the exact original."""
    patcher, _ = fp8_patcher
    layer = patcher.model.diffusion_model.transformer_blocks[0].ff.net[2]
    original = layer.weight.detach().clone()
    scale = layer.scale_weight.reshape(-1, 1)
    before = original.float() * scale
    diff = -0.5 * before  # halves the layer: inside the fp8 range, exact in fp8 but for subnormals
    patched = patcher.clone()
    key = "diffusion_model.transformer_blocks.0.ff.net.2.weight"
    assert patched.add_patches({key: ("diff", (diff,))}) == [key]
    patched.patch_model(device_to=torch.device("cpu"))
    try:
        expected = ((before + diff) / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight, expected)
        assert rel(layer.weight.float() * scale, 0.5 * before) <= 2 ** -4
    finally:
        patched.unpatch_model(torch.device("cpu"))
    assert torch.equal(layer.weight, original)


def test_a_counter_sees_one_dit_call_per_apply(nat, patcher):
    counter = CallCounter(patcher.model.diffusion_model)
    try:
        pos, _ = prompts()
        apply(patcher, nat, torch.randn(1, 64, 3, 3, 2), 0.5, pos)
    finally:
        counter.remove()
    assert counter.calls == 1 and counter.shapes == [(1, 64, 3, 3, 2)]


class Elsewhere(torch.Tensor):
    """Stands for a tensor resting on another device than the activations (what ComfyUI's partial
    loading leaves for module-level tables): using it in arithmetic raises; ``.to(...)`` is the way."""

    moves = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cls.moves += 1
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].as_subclass(torch.Tensor).to(*args[1:], **kwargs).clone()
        if getattr(func, "__name__", "") == "__get__":  # attributes (dtype, shape) are fine
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise RuntimeError(f"{getattr(func, '__name__', func)} on a tensor that rests on another device")


def test_modulation_tables_follow_the_activations_device(nat, patcher):
    """Partial loading never moves the tables of modules that also have children (every block's and the
    final layer's ``scale_shift_table``); the DiT brings them to the activations' device itself."""
    dit = patcher.model.diffusion_model
    pos, _ = prompts()
    x = torch.randn(1, 64, 3, 3, 2, generator=torch.Generator().manual_seed(6))
    before = apply(patcher, nat, x, 0.5, pos)
    owners = [*dit.transformer_blocks, dit]
    saved = [m._parameters["scale_shift_table"] for m in owners]
    try:
        for owner, table in zip(owners, saved):
            owner._parameters["scale_shift_table"] = table.detach().as_subclass(Elsewhere)
        Elsewhere.moves = 0
        after = apply(patcher, nat, x, 0.5, pos)
    finally:
        for owner, table in zip(owners, saved):
            owner._parameters["scale_shift_table"] = table
    assert Elsewhere.moves == len(owners)
    assert torch.equal(after, before)


def test_context_windows_keep_the_text_whole(nat, patcher, comfy):
    """The generic context-window code slices any cond whose size on the frame axis equals the latent's;
    Step-LLM states [B, S, 96] would be cut at 96 latent frames: the model hands the text conds over whole."""
    import comfy.context_windows

    pos, _ = prompts()
    (states, extras), = nat.model.native_conditioning(pos)
    conds = [{"model_conds": patcher.model.extra_conds(cross_attn=states, **extras)}]
    handler = comfy.context_windows.IndexListContextHandler(
        comfy.context_windows.get_matching_context_schedule("standard_static"),
        comfy.context_windows.get_matching_fuse_method("pyramid"), context_length=16, context_overlap=4, dim=2)
    handler._model = patcher.model
    x = torch.zeros(1, 64, states.shape[-1], 3, 2)  # as many latent frames as the LLM states are wide
    window = comfy.context_windows.IndexListContextWindow(list(range(16)), dim=2, total_frames=x.shape[2])
    (resized,) = handler.get_resized_cond(conds, x, window)
    for key in ("c_crossattn", "encoder_hidden_states_2", "encoder_attention_mask"):
        assert torch.equal(resized["model_conds"][key].cond, conds[0]["model_conds"][key].cond), key


def test_weight_functions_of_cast_fp8_layers_see_the_dequantised_weight(nat, fp8_patcher):
    """A partially loaded layer's LoRA patch runs as a weight function at cast time (ComfyUI's
    LowVramPatch): on an fp8 layer it must get weight*scale, not the raw fp8 values."""
    patcher, _ = fp8_patcher
    layer = patcher.model.diffusion_model.transformer_blocks[1].attn2.wo
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    diff = torch.full((layer.out_features, layer.in_features), 1e-3)
    seen = []
    layer.comfy_cast_weights = True
    layer.weight_function = [lambda w: seen.append(w.abs().amax()) or w + diff]
    try:
        out = layer(x)
    finally:
        layer.comfy_cast_weights = False
        layer.weight_function = []
    full = nat.core.fp8.dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
    assert float(seen[0]) == pytest.approx(float(full.abs().amax()))
    torch.testing.assert_close(out, torch.nn.functional.linear(x, full + diff), rtol=1e-6, atol=1e-6)
