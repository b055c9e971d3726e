"""The pack against a real ComfyUI tree, in-process: the bridge's calls into folder_paths,
comfy.utils and comfy.model_management, and the loader on ComfyUI's model folders.

Needs COMFYUI_DIR pointing at a ComfyUI checkout (v0.33+) and this interpreter with ComfyUI's
requirements, e.g.:
``COMFYUI_DIR=~/comfy/ComfyUI ~/comfy/venv/bin/python -m pytest -q tests/e2e``; skipped without
them (failed under CI=true, see tests/e2e/conftest.py).
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.factory import write_tiny_dit


@pytest.fixture(scope="module")
def comfy(comfyui_importable):
    """ComfyUI's (folder_paths, comfy.model_management), forced onto the CPU when there is no GPU."""
    tree = str(comfyui_importable)
    if tree not in sys.path:
        sys.path.append(tree)  # last, so ComfyUI's own `tests`/`nodes` shadow nothing of ours
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True  # what `main.py --cpu` sets; model_management reads it at import
    import comfy.model_management as mm
    import folder_paths

    return folder_paths, mm


@pytest.fixture
def real_bridge(pack, comfy, monkeypatch):
    """The pack's bridge with its module cache emptied, so it finds the real ComfyUI modules."""
    module = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
    monkeypatch.setattr(module.modules, "_MODULES", {})
    monkeypatch.delenv(module.ENV_MODELS_DIR, raising=False)
    return module


def test_loader_uses_comfyui_folders_and_devices(pack, real_bridge, comfy, tmp_path, monkeypatch):
    folder_paths, mm = comfy
    dm = tmp_path / "diffusion_models"
    write_tiny_dit(dm / "stepvideo-t2v-tiny")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(dm)], folder_paths.supported_pt_extensions))

    assert real_bridge.in_comfyui()
    assert real_bridge.list_model_entries("diffusion_models") == ["stepvideo-t2v-tiny"]
    loader = sys.modules[f"{pack.__name__}.nodes.model"].StepVideoModelLoader
    assert loader.INPUT_TYPES()["required"]["model"][0] == ["stepvideo-t2v-tiny"]

    (handle,) = loader().load(model="stepvideo-t2v-tiny", weight_dtype="default", attention="sdpa")["result"]
    assert handle.device == torch.device(mm.get_torch_device())
    assert handle.offload_device == torch.device(mm.unet_offload_device())
    assert next(handle.transformer.parameters()).device == handle.offload_device


def test_progress_interrupt_and_memory_go_to_comfyui(real_bridge, comfy):
    _, mm = comfy
    bar = real_bridge.progress_bar(3)
    assert type(bar).__module__ == "comfy.utils"
    bar.update(1)
    bar.update_absolute(3, 3, None)

    assert real_bridge.interrupt_requested() is False
    mm.interrupt_current_processing(True)
    try:
        assert real_bridge.interrupt_requested() is True
        with pytest.raises(mm.InterruptProcessingException):
            real_bridge.check_interrupt()
    finally:
        mm.interrupt_current_processing(False)

    real_bridge.free_memory()
    real_bridge.free_memory(1 << 20, real_bridge.torch_device())
