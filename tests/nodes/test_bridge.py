"""comfy_bridge: model listing/resolving, progress, interrupts, devices — with and without ComfyUI."""

from __future__ import annotations

import json
import logging
import os
import types

import pytest
import torch


def touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_sharded(folder, n=3):
    """Write a fake sharded model folder: config.json, n shards, an index."""
    touch(folder / "config.json", "{}")
    for k in range(1, n + 1):
        touch(folder / f"diffusion_pytorch_model-{k:05d}-of-{n:05d}.safetensors")
    touch(folder / "diffusion_pytorch_model.safetensors.index.json", json.dumps({"weight_map": {}}))
    return folder


# ----------------------------------------------------------------------------- listing


def test_listing_is_empty_without_any_folder(bridge):
    assert bridge.model_dirs("diffusion_models") == []
    assert bridge.list_model_entries("diffusion_models") == []


def test_unknown_kind_is_refused(bridge):
    with pytest.raises(ValueError, match="unknown model folder kind"):
        bridge.list_model_entries("checkpointz")


def test_single_files_are_listed_recursively_with_posix_names(bridge, models_dir):
    dm = models_dir / "diffusion_models"
    touch(dm / "b.safetensors")
    touch(dm / "sub" / "A.sft")
    touch(dm / "notes.txt")
    touch(dm / "old.ckpt")
    touch(dm / ".hidden" / "h.safetensors")
    assert bridge.list_model_entries("diffusion_models") == ["b.safetensors", "sub/A.sft"]


def test_sharded_folder_is_one_entry_not_its_shards(bridge, models_dir):
    dm = models_dir / "diffusion_models"
    make_sharded(dm / "stepvideo-t2v" / "transformer")
    touch(dm / "single.safetensors")
    assert bridge.list_model_entries("diffusion_models") == ["single.safetensors", "stepvideo-t2v"]


def test_official_root_is_one_entry_and_hides_its_other_components(bridge, models_dir):
    root = models_dir / "diffusion_models" / "stepvideo-t2v"
    make_sharded(root / "transformer")
    touch(root / "vae" / "vae_v2.safetensors")
    make_sharded(root / "step_llm")
    assert bridge.list_model_entries("diffusion_models") == ["stepvideo-t2v"]


def test_bare_transformer_folder_is_an_entry(bridge, models_dir):
    make_sharded(models_dir / "diffusion_models" / "my_dit")
    assert bridge.list_model_entries("diffusion_models") == ["my_dit"]


def test_folder_without_index_is_not_a_model_folder(bridge, models_dir):
    folder = models_dir / "diffusion_models" / "loose"
    touch(folder / "config.json", "{}")
    touch(folder / "part1.safetensors")
    assert bridge.list_model_entries("diffusion_models") == ["loose/part1.safetensors"]


def test_official_root_counts_only_for_its_kind(bridge, models_dir):
    root = models_dir / "vae" / "stepvideo-t2v"
    make_sharded(root / "transformer")
    touch(root / "vae" / "vae_v2.safetensors")
    # Under vae/ the root is not a DiT entry; the sharded transformer folder still is one entry.
    assert bridge.list_model_entries("vae") == ["stepvideo-t2v/transformer", "stepvideo-t2v/vae/vae_v2.safetensors"]


def test_several_roots_merge_and_first_root_wins(bridge, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    touch(a / "loras" / "shared.safetensors", "from a")
    touch(b / "loras" / "shared.safetensors", "from b")
    touch(b / "loras" / "only_b.safetensors")
    monkeypatch.setenv(bridge.ENV_MODELS_DIR, os.pathsep.join([str(a), str(b)]))
    assert bridge.list_model_entries("loras") == ["only_b.safetensors", "shared.safetensors"]
    assert bridge.resolve_model_path("loras", "shared.safetensors").read_text() == "from a"


def test_resolve_returns_absolute_path_of_file_and_folder(bridge, models_dir):
    dm = models_dir / "diffusion_models"
    make_sharded(dm / "stepvideo-t2v" / "transformer")
    touch(dm / "x" / "one.safetensors")
    assert bridge.resolve_model_path("diffusion_models", "x/one.safetensors") == (dm / "x" / "one.safetensors").resolve()
    got = bridge.resolve_model_path("diffusion_models", "stepvideo-t2v")
    assert got.is_absolute() and got == (dm / "stepvideo-t2v").resolve()


def test_resolve_missing_entry_names_the_folders_searched(bridge, models_dir):
    with pytest.raises(FileNotFoundError) as err:
        bridge.resolve_model_path("diffusion_models", "nope.safetensors")
    assert "nope.safetensors" in str(err.value)
    assert str(models_dir / "diffusion_models") in str(err.value)


def test_resolve_without_folders_says_how_to_configure(bridge):
    with pytest.raises(FileNotFoundError, match="STEPVIDEO_MODELS_DIR"):
        bridge.resolve_model_path("vae", "vae.safetensors")


@pytest.mark.parametrize("name", ["", "../escape.safetensors", "/etc/passwd"])
def test_resolve_refuses_names_leaving_the_folder(bridge, models_dir, name):
    touch(models_dir / "escape.safetensors")
    with pytest.raises(FileNotFoundError, match="invalid"):
        bridge.resolve_model_path("diffusion_models", name)


def test_comfyui_folders_come_first_then_env_roots(bridge, models_dir, tmp_path, monkeypatch):
    unet, dm = tmp_path / "comfy" / "unet", tmp_path / "comfy" / "diffusion_models"
    touch(unet / "u.safetensors")
    make_sharded(dm / "stepvideo-t2v" / "transformer")
    touch(models_dir / "diffusion_models" / "u.safetensors", "env copy")
    fake_fp = types.SimpleNamespace(get_folder_paths=lambda kind: [str(unet), str(dm), str(tmp_path / "missing")])
    monkeypatch.setitem(bridge._MODULES, "folder_paths", fake_fp)
    assert bridge.in_comfyui()
    assert bridge.model_dirs("diffusion_models") == [unet, dm, models_dir / "diffusion_models"]
    assert bridge.list_model_entries("diffusion_models") == ["stepvideo-t2v", "u.safetensors"]
    assert bridge.resolve_model_path("diffusion_models", "u.safetensors") == (unet / "u.safetensors").resolve()


def test_comfyui_without_the_kind_falls_back_to_env(bridge, models_dir, monkeypatch):
    def no_such_key(kind):
        raise KeyError(kind)

    monkeypatch.setitem(bridge._MODULES, "folder_paths", types.SimpleNamespace(get_folder_paths=no_such_key))
    touch(models_dir / "text_encoders" / "clip.safetensors")
    assert bridge.list_model_entries("text_encoders") == ["clip.safetensors"]


# ----------------------------------------------------------------------------- progress, interrupts


def test_progress_outside_comfyui_logs_a_bounded_number_of_lines(bridge, caplog):
    bar = bridge.progress_bar(100)
    assert isinstance(bar, bridge.LogProgress)
    with caplog.at_level(logging.INFO, logger="StepVideo"):
        for _ in range(100):
            bar.update(1)
    assert bar.current == 100
    assert 1 <= len(caplog.records) <= 11
    bar.update_absolute(5, total=10, preview=("JPEG", None, 512))
    assert (bar.current, bar.total) == (5, 10)


def test_progress_inside_comfyui_uses_its_progress_bar(bridge, monkeypatch):
    made = []
    fake_utils = types.SimpleNamespace(ProgressBar=lambda total: made.append(total) or "bar")
    monkeypatch.setitem(bridge._MODULES, "comfy.utils", fake_utils)
    assert bridge.progress_bar(7) == "bar" and made == [7]


def test_interrupt_flag_outside_comfyui(bridge):
    assert not bridge.interrupt_requested()
    bridge.check_interrupt()  # nothing requested: no exception
    bridge.request_interrupt()
    assert bridge.interrupt_requested()
    with pytest.raises(bridge.StepVideoInterrupted):
        bridge.check_interrupt()
    assert not bridge.interrupt_requested()  # cleared once it fired


class FakeModelManagement:
    """Records calls the bridge makes into comfy.model_management."""

    class InterruptProcessingException(BaseException):
        pass

    def __init__(self, interrupted=False):
        self.interrupted, self.calls = interrupted, []

    def processing_interrupted(self):
        return self.interrupted

    def throw_exception_if_processing_interrupted(self):
        if self.interrupted:
            raise self.InterruptProcessingException()

    def get_torch_device(self):
        return torch.device("cpu")

    def unet_offload_device(self):
        return torch.device("cpu")

    def unload_all_models(self):
        self.calls.append("unload_all_models")

    def free_memory(self, required, device):
        self.calls.append(("free_memory", required, device))

    def soft_empty_cache(self):
        self.calls.append("soft_empty_cache")


def test_interrupt_and_memory_inside_comfyui_go_to_model_management(bridge, monkeypatch):
    mm = FakeModelManagement(interrupted=True)
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", mm)
    assert bridge.interrupt_requested()
    with pytest.raises(mm.InterruptProcessingException):
        bridge.check_interrupt()
    bridge.free_memory()
    bridge.free_memory(1 << 30, torch.device("cpu"))
    assert mm.calls == ["unload_all_models", "soft_empty_cache",
                        ("free_memory", 1 << 30, torch.device("cpu")), "soft_empty_cache"]
    assert bridge.torch_device() == torch.device("cpu")
    assert bridge.offload_device() == torch.device("cpu")


# ----------------------------------------------------------------------------- devices


def test_devices_outside_comfyui(bridge):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert bridge.torch_device().type == expected
    assert bridge.offload_device() == torch.device("cpu")
    bridge.free_memory()  # must not fail without ComfyUI


def test_comfy_lookup_caches_a_missing_module(bridge, monkeypatch):
    monkeypatch.delitem(bridge._MODULES, "stepvideo_no_such_module", raising=False)
    assert bridge._comfy("stepvideo_no_such_module") is None
    assert bridge._MODULES["stepvideo_no_such_module"] is None
    monkeypatch.delitem(bridge._MODULES, "stepvideo_no_such_module")
