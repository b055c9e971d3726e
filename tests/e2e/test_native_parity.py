"""The native MODEL through ComfyUI's own samplers gives StepVideoSampler's video (in-process, real
ComfyUI modules and nodes, tiny DiT on the CPU): the official schedule as SIGMAS, the pack's noise as
NOISE, SamplerCustomAdvanced (CFGGuider + KSAMPLER euler) against StepVideoSampler and the core
sampler; other samplers, denoise < 1 from a VAE-encoded latent, SetLatentNoiseMask, ModelSamplingSD3.

Needs COMFYUI_DIR (see tests/e2e/conftest.py); skipped without it, failed under CI=true.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_native_support import SIZE, CallCounter, core_dit, extras, native_dit, prompts, rel
from tests.e2e.test_native_support import comfy, nat, custom, cnodes  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "stepvideo_scheduler.safetensors"


def guided(nat, steps):
    """The core sampler's settings of these parity runs: SIZE, cfg 9, shift 13, seed 3 (the seed the
    native runs use; a run given its own noise ignores it)."""
    return nat.core.SamplingSettings(**SIZE, steps=steps, cfg=9.0, shift=13.0, seed=3)


def native_cond(nat, cond):
    return nat.model.native_conditioning(cond)


def custom_advanced(nat, custom, patcher, steps, cfg, shift, seed, sampler="euler", latent=None):
    """SamplerCustomAdvanced with CFGGuider, KSamplerSelect, StepVideoScheduler and StepVideoNoise."""
    pos, neg = prompts()
    guider = custom.CFGGuider.execute(patcher, native_cond(nat, pos), native_cond(nat, neg), cfg).args[0]
    ksampler = custom.KSamplerSelect.execute(sampler).args[0]
    (sigmas,) = nat.nodes.StepVideoScheduler().get_sigmas(steps, shift, 1.0)
    (noise,) = nat.nodes.StepVideoNoise().get_noise(seed)
    if latent is None:
        (latent,) = nat.nodes.StepVideoEmptyLatent().generate(**SIZE, batch_size=1)
    out, _denoised = custom.SamplerCustomAdvanced.execute(noise, guider, ksampler, sigmas, latent).args
    return out["samples"]


def step_video_sampler(nat, dit, steps, cfg, shift, seed):
    """StepVideoSampler (the one-node path) on the plain core model with the same weights."""
    pos, neg = prompts()
    handle = nat.types.StepVideoModelHandle(transformer=dit, dtype=dit.compute_dtype, device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"), attention="sdpa", source=Path("tiny"))
    out = nat.sampler.StepVideoSampler().sample(model=handle, positive=pos, negative=neg, preset="Step-Video-T2V",
                                                **SIZE, steps=steps, cfg=cfg, shift=shift, seed=seed)
    return out["result"][0]["samples"]


# --------------------------------------------------------------------------- schedule, noise, latent


@pytest.mark.parametrize("shift", [13.0, 17.0])
@pytest.mark.parametrize("steps", [2, 15, 50])
def test_scheduler_is_the_official_schedule_in_comfy_convention(nat, steps, shift):
    (sigmas,) = nat.nodes.StepVideoScheduler().get_sigmas(steps, shift, 1.0)
    official = nat.core.flow_match_sigmas(steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert torch.equal(1 - sigmas, official)  # the DiT is given 1 - sigma_c: the official value, bit for bit
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all())
    torch.testing.assert_close(sigmas, 1 - official, rtol=0, atol=2 ** -24)


@pytest.mark.parametrize("case, steps, shift", [("t2v_50_shift13", 50, 13.0), ("turbo_15_shift17", 15, 17.0)])
def test_scheduler_matches_the_official_scheduler_fixture(nat, case, steps, shift):
    official = load_file(str(FIXTURE))
    (sigmas,) = nat.nodes.StepVideoScheduler().get_sigmas(steps, shift, 1.0)
    torch.testing.assert_close(1 - sigmas, official[f"{case}.sigmas"], rtol=0, atol=2 ** -22)


def test_scheduler_denoise_takes_the_tail_of_a_longer_schedule(nat):
    (half,) = nat.nodes.StepVideoScheduler().get_sigmas(10, 13.0, 0.5)
    (full,) = nat.nodes.StepVideoScheduler().get_sigmas(20, 13.0, 1.0)
    assert torch.equal(half, full[-11:])
    assert nat.nodes.StepVideoScheduler().get_sigmas(10, 13.0, 0.0)[0].numel() == 0
    with pytest.raises(ValueError, match="finite"):
        nat.nodes.StepVideoScheduler().get_sigmas(10, float("nan"), 1.0)


def test_noise_is_the_pack_seeded_noise_in_comfy_layout(nat):
    (latent,) = nat.nodes.StepVideoEmptyLatent().generate(**SIZE, batch_size=2)
    (noise,) = nat.nodes.StepVideoNoise().get_noise(1234)
    assert noise.seed == 1234
    got = noise.generate_noise(latent)
    expected = nat.core.sampling.initial_noise((2, 3, 64, 3, 2), 1234).float().movedim(1, 2)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_empty_latent_follows_the_pack_size_rules(nat):
    (latent,) = nat.nodes.StepVideoEmptyLatent().generate(width=992, height=544, frames=204, batch_size=1)
    assert latent["samples"].shape == (1, 64, 36, 34, 62) and not latent["samples"].any()
    with pytest.raises(ValueError, match="nearest valid: 17 or 34"):
        nat.nodes.StepVideoEmptyLatent().generate(width=32, height=48, frames=20, batch_size=1)


# --------------------------------------------------------------------------- the same video on both paths


@pytest.fixture(scope="module")
def fp32_pair(nat):
    return nat.model.make_patcher(native_dit(nat)), core_dit(nat)


@pytest.mark.parametrize("steps", [2, 15])
def test_sampler_custom_advanced_equals_step_video_sampler_fp32(nat, custom, fp32_pair, steps):
    patcher, dit = fp32_pair
    native_out = custom_advanced(nat, custom, patcher, steps, 9.0, 13.0, seed=3)
    node_out = step_video_sampler(nat, dit, steps, 9.0, 13.0, seed=3)
    pos, neg = prompts()
    core_out = nat.core.sample(dit, pos, neg, settings=guided(nat, steps)).movedim(1, 2)
    assert torch.equal(node_out, core_out)
    assert native_out.shape == core_out.shape == (1, 64, 3, 3, 2)
    assert rel(native_out, core_out) <= 1e-5


def hybrid_reference(nat, dit, steps, cfg, shift, seed):
    """The official loop with one change: CFG combined in fp32 (as ComfyUI does) instead of the
    velocities' own dtype.  Everything else -- cond and uncond in one batch (in ComfyUI's order),
    inputs cast to the compute dtype, fp32 Euler in the official parametrisation -- as the pack's sampler."""
    pos, neg = prompts()
    sigmas = nat.core.flow_match_sigmas(steps, shift)
    latents = nat.core.sampling.initial_noise((1, 3, 64, 3, 2), seed).float()
    dtype = dit.compute_dtype
    keys = ("encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")
    both = {k: torch.cat([neg[k], pos[k]]).to(dtype) for k in keys}  # ComfyUI batches [uncond, cond]
    with torch.inference_mode():
        for i in range(steps):
            x = latents.to(dtype)
            v_u, v_c = dit(torch.cat([x, x]), sigmas[i].expand(2).to(dtype), **both).chunk(2)
            v = v_u.float() + cfg * (v_c.float() - v_u.float())
            latents = latents + v * (sigmas[i + 1] - sigmas[i])
    return latents.movedim(1, 2)


def test_bf16_difference_is_cfg_in_fp32_then_bf16_rounding_of_the_latents(nat, custom):
    """bf16: one step equals the official loop with CFG combined in fp32 *exactly* (so the only
    difference from StepVideoSampler at one step is that the official loop combines CFG in bf16);
    over several steps the two paths' fp32 latents differ in the last bits (Euler in ComfyUI's
    parametrisation), which bf16 rounding of the next model input amplifies about as much as a 1e-7
    change of the initial noise does on the pack's own path."""
    patcher, dit = nat.model.make_patcher(native_dit(nat, torch.bfloat16)), core_dit(nat, torch.bfloat16)
    one = custom_advanced(nat, custom, patcher, 1, 9.0, 13.0, seed=3)
    assert torch.equal(one, hybrid_reference(nat, dit, 1, 9.0, 13.0, seed=3))
    pos, neg = prompts()
    official_one = nat.core.sample(dit, pos, neg, settings=guided(nat, 1)).movedim(1, 2)
    assert 0 < rel(one, official_one) < 0.02

    steps = 3
    native_out = custom_advanced(nat, custom, patcher, steps, 9.0, 13.0, seed=3)
    assert rel(native_out, hybrid_reference(nat, dit, steps, 9.0, 13.0, seed=3)) < 0.05
    official = nat.core.sample(dit, pos, neg, settings=guided(nat, steps)).movedim(1, 2)
    reference32 = nat.core.sample(core_dit(nat), pos, neg, settings=guided(nat, steps)).movedim(1, 2)
    noise = nat.core.sampling.initial_noise((1, 3, 64, 3, 2), 3).float()
    nudged = noise * (1 + 1e-7 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(9)))
    sensitivity = rel(nat.core.sample(dit, pos, neg, settings=guided(nat, steps), noise=nudged)
                      .movedim(1, 2), official)
    assert rel(native_out, official) < 3 * sensitivity + 1e-3
    # and the native bf16 video is no further from the fp32 reference than the pack's own bf16 one, give or take
    assert rel(native_out, reference32) < 1.5 * rel(official, reference32)


# --------------------------------------------------------------------------- the rest of ComfyUI's sampling


@pytest.fixture(scope="module")
def euler20(nat, custom, fp32_pair):
    return custom_advanced(nat, custom, fp32_pair[0], 20, 9.0, 13.0, seed=3)


@pytest.mark.parametrize("sampler", ["uni_pc", "dpmpp_2m", "heun"])
def test_other_ode_samplers_solve_the_same_ode(nat, custom, fp32_pair, euler20, sampler):
    """Multi-step and second-order solvers use the model's output at other sigmas and combinations of
    several outputs: with the convention right they land near Euler's result (measured at 20 steps:
    uni_pc 0.28, dpmpp_2m 0.13, heun 0.05 relative; Euler vs the initial noise: 2.6)."""
    out = custom_advanced(nat, custom, fp32_pair[0], 20, 9.0, 13.0, seed=3, sampler=sampler)
    assert out.shape == (1, 64, 3, 3, 2) and bool(torch.isfinite(out).all())
    assert rel(out, euler20) < 0.35


def test_an_ancestral_sampler_runs(nat, custom, fp32_pair):
    out = custom_advanced(nat, custom, fp32_pair[0], 6, 9.0, 13.0, seed=3, sampler="euler_ancestral")
    assert out.shape == (1, 64, 3, 3, 2) and bool(torch.isfinite(out).all())


@pytest.fixture(scope="module")
def release_vae(nat, tmp_path_factory):
    """The tiny release's VAE (8 latent channels) as a STEPVIDEO_VAE handle, and a DiT that fits it."""
    vae_mod = nat.vae
    path = nat.tiny.write_tiny_vae(tmp_path_factory.mktemp("vae"))
    vae = nat.core.load_vae(path, dtype=torch.float32, device="cpu")
    handle = nat.types.StepVideoVAEHandle(vae=vae, dtype=torch.float32, device=torch.device("cpu"),
                                          offload_device=torch.device("cpu"), source=Path(path))
    return vae_mod, handle, dict(nat.tiny.TINY_RELEASE_DIT_CONFIG)


def test_denoise_half_from_a_vae_encoded_latent(nat, cnodes, release_vae):
    """KSampler with denoise 0.5 starts from sigma_0 * noise + (1 - sigma_0) * the encoded video."""
    vae_mod, vae, config = release_vae
    frames = torch.linspace(0, 1, 17 * 32 * 48 * 3).reshape(17, 32, 48, 3)
    (latent,) = vae_mod.StepVideoVAEEncode().encode(vae, frames, mode="mean")
    assert latent["samples"].shape == (1, 8, 3, 2, 3)
    dit = native_dit(nat, config=config)
    patcher = nat.model.make_patcher(dit)
    first = []
    hook = dit.register_forward_pre_hook(lambda m, args: first.append(args[0].clone()) if not first else None)
    pos, neg = (native_cond(nat, c) for c in prompts())
    try:
        (out,) = cnodes.KSampler().sample(patcher, 5, 6, 4.0, "euler", "simple", pos, neg, latent, denoise=0.5)
    finally:
        hook.remove()
    import comfy.sample
    import comfy.samplers

    sigmas = comfy.samplers.KSampler(patcher, steps=6, device="cpu", sampler="euler", scheduler="simple",
                                     denoise=0.5).sigmas
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    start = sigmas[0] * noise + (1 - sigmas[0]) * latent["samples"]
    assert 0 < float(sigmas[0]) < 1
    torch.testing.assert_close(first[0][:1], start, rtol=0, atol=1e-6)
    assert out["samples"].shape == latent["samples"].shape and bool(torch.isfinite(out["samples"]).all())


def test_set_latent_noise_mask_keeps_the_masked_out_region(nat, cnodes, fp32_pair):
    patcher, _ = fp32_pair
    base = torch.randn(1, 64, 3, 3, 2, generator=torch.Generator().manual_seed(8))
    mask = torch.zeros(1, 3, 2)
    mask[:, :, 1] = 1.0  # only the right column is sampled
    (masked,) = cnodes.SetLatentNoiseMask().set_mask({"samples": base}, mask)
    pos, neg = (native_cond(nat, c) for c in prompts())
    (out,) = cnodes.KSampler().sample(patcher, 1, 4, 9.0, "euler", "simple", pos, neg, masked, denoise=1.0)
    torch.testing.assert_close(out["samples"][..., 0], base[..., 0], rtol=0, atol=1e-5)
    assert rel(out["samples"][..., 1], base[..., 1]) > 0.1


def test_model_sampling_sd3_shift_13_gives_the_same_video(nat, custom, comfyui_importable, fp32_pair):
    """ModelSamplingSD3 patches in multiplier 1000: the model still gets sigma (normalised), same result."""
    advanced = extras(comfyui_importable, "nodes_model_advanced")
    patcher, _ = fp32_pair
    (sd3,) = advanced.ModelSamplingSD3().patch(patcher, 13.0)
    assert sd3.get_model_object("model_sampling").multiplier == 1000
    base = custom_advanced(nat, custom, patcher, 4, 9.0, 13.0, seed=3)
    assert rel(custom_advanced(nat, custom, sd3, 4, 9.0, 13.0, seed=3), base) <= 1e-5
    counter = CallCounter(sd3.model.diffusion_model)
    try:
        custom_advanced(nat, custom, sd3, 2, 9.0, 13.0, seed=3)
    finally:
        counter.remove()
    assert counter.calls == 2  # cond and uncond in one batched call per step
