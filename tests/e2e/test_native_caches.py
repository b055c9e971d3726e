"""ComfyUI's model patches on the native MODEL (in-process, real nodes, tiny DiT on the CPU): EasyCache
and LazyCache skip DiT calls, MultiGPU CFG Split and context windows.

Needs COMFYUI_DIR (see tests/e2e/conftest.py); skipped without it, failed under CI=true.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_native_parity import custom_advanced, native_cond
from tests.e2e.test_native_support import CallCounter, extras, native_dit, prompts, rel
from tests.e2e.test_native_support import comfy, nat, custom  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 20


@pytest.fixture(scope="module")
def patcher(nat):
    return nat.model.make_patcher(native_dit(nat))


def counted(nat, custom, model, steps=STEPS, **kwargs):
    """(latent, DiT computations) of a SamplerCustomAdvanced run (cond + uncond batched: one per step)."""
    counter = CallCounter(model.model.diffusion_model)
    try:
        out = custom_advanced(nat, custom, model, steps, 9.0, 13.0, seed=3, **kwargs)
    finally:
        counter.remove()
    return out, counter


@pytest.fixture(scope="module")
def plain(nat, custom, patcher):
    return counted(nat, custom, patcher)


@pytest.mark.parametrize("node, threshold, most_calls, bound", [("EasyCacheNode", 1.0, 14, 0.3),
                                                               ("LazyCacheNode", 1.0, 10, 0.3)])
def test_caches_skip_dit_calls_and_change_the_video_by_a_bounded_amount(nat, custom, comfyui_importable, patcher,
                                                                         plain, node, threshold, most_calls, bound):
    """Both caches wrap the native model (EasyCache: the DIFFUSION_MODEL wrapper around its forward in
    ComfyUI's layout; LazyCache: the guider's noise prediction) and reuse cached output differences.

    Measured on the tiny random DiT (its output changes by ~0.5 of its size per step, far more than a
    trained model's, so the default threshold 0.2 skips nothing here), 20 steps, 15 %..95 %:
    EasyCache 0.5: 18 DiT calls, 0.027 relative change; 1.0: 13 calls, 0.21.
    LazyCache 0.5: 12 calls, 0.12; 1.0: 9 calls, 0.19.
    """
    base, base_counter = plain
    assert base_counter.calls == STEPS
    cls = getattr(extras(comfyui_importable, "nodes_easycache"), node)
    cached = cls.execute(patcher, threshold, 0.15, 0.95, False).args[0]
    out, counter = counted(nat, custom, cached)
    assert counter.calls <= most_calls
    assert 0 < rel(out, base) < bound
    assert set(counter.shapes) == {(2, 64, 3, 3, 2)}  # what does run is the normal batched call


def test_multigpu_cfg_split_is_a_no_op_with_one_device(nat, custom, comfyui_importable, patcher, plain):
    """ComfyUI's MultiGPU CFG Split adds a deep clone per extra device; with one device there is none
    and sampling is unchanged."""
    node = extras(comfyui_importable, "nodes_multigpu").MultiGPUCFGSplitNode
    split = node.execute(patcher, 2).args[0]
    assert split.get_additional_models_with_key("multigpu") == []
    out, counter = counted(nat, custom, split)
    assert torch.equal(out, plain[0]) and counter.calls == STEPS


def test_a_loaded_model_can_be_deep_cloned_for_another_device(nat, tmp_path, comfy):
    """What MultiGPU CFG Split does per extra GPU: the loader's patcher re-creates itself with fresh weights."""
    path = nat.tiny.write_tiny_dit(tmp_path / "dit")
    loaded = nat.model.load_native_patcher(path, torch.float32, "full", "sdpa")
    clone = loaded.deepclone_multigpu(new_load_device=torch.device("cpu"))
    assert clone.model is not loaded.model
    assert nat.model.is_stepvideo_patcher(clone)
    a = dict(loaded.model.diffusion_model.named_parameters())
    b = dict(clone.model.diffusion_model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k] is not b[k] for k in a)


def test_context_windows_run_the_dit_on_windows_of_frames(nat, custom, comfyui_importable, patcher):
    """ContextWindowsManual on the frame axis (dim 2): the DiT sees windows of latent frames and the
    whole text (the text conds have no frame axis); 9 latent frames, windows of 6 with overlap 2."""
    windows = extras(comfyui_importable, "nodes_context_windows").ContextWindowsManualNode
    model = windows.execute(patcher, 6, 2, "standard_static", 1, False, "pyramid", 2, False).args[0]
    (latent,) = nat.nodes.StepVideoEmptyLatent().generate(width=32, height=48, frames=51, batch_size=1)
    counter = CallCounter(model.model.diffusion_model)
    try:
        out = custom_advanced(nat, custom, model, 3, 9.0, 13.0, seed=3, latent=latent)
    finally:
        counter.remove()
    assert out.shape == (1, 64, 9, 3, 2) and bool(torch.isfinite(out).all())
    # windows of 6 frames; a window not starting at frame 0 gets frame 0 as an extra anchor (causal_window_fix)
    assert {s[2] for s in counter.shapes} == {6, 7}
    assert counter.calls == 3 * 2  # two windows per step
    full = custom_advanced(nat, custom, patcher, 3, 9.0, 13.0, seed=3, latent=latent)
    assert rel(out, full) > 0  # windows are not the full attention


def test_cfg_1_runs_one_dit_call_per_step_without_negative(nat, custom, patcher):
    pos, _ = prompts()
    guider = custom.CFGGuider.execute(patcher, native_cond(nat, pos), native_cond(nat, pos), 1.0).args[0]
    counter = CallCounter(patcher.model.diffusion_model)
    try:
        ksampler = custom.KSamplerSelect.execute("euler").args[0]
        (sigmas,) = nat.nodes.StepVideoScheduler().get_sigmas(3, 13.0, 1.0)
        (noise,) = nat.nodes.StepVideoNoise().get_noise(3)
        (latent,) = nat.nodes.StepVideoEmptyLatent().generate(width=32, height=48, frames=17, batch_size=1)
        custom.SamplerCustomAdvanced.execute(noise, guider, ksampler, sigmas, latent)
    finally:
        counter.remove()
    assert counter.calls == 3 and set(counter.shapes) == {(1, 64, 3, 3, 2)}
