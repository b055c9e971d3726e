"""comfy_bridge: model listing/resolving, progress, interrupts, devices — with and without ComfyUI."""

from __future__ import annotations

import ast
import json
import logging
import os
import types
from pathlib import Path

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


JOBS = ("folders", "memory", "models", "modules", "progress", "server")


def defined_names(module) -> dict:
    """The public names `module` defines at its top level (functions, classes, assignments), read from its source."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {name: getattr(module, name) for name in names if not name.startswith("_") and name != "log"}


def test_package_reexports_every_public_name_of_its_job_modules(bridge):
    """Node code calls ``bridge.<name>``: each job module's public names are the package's, the same objects,
    and no name is defined by two modules."""
    seen = {}
    for job in JOBS:
        module = getattr(bridge, job)
        assert "outside comfyui" in " ".join((module.__doc__ or "").split()).lower()  # says how it degrades
        for name, value in defined_names(module).items():
            assert name not in seen, f"{name} defined in {seen[name]} and {job}"
            seen[name] = job
            assert getattr(bridge, name) is value and name in bridge.__all__, f"{job}.{name} not re-exported"
    assert {"model_dirs", "progress_bar", "free_vram", "model_patcher", "add_route", "in_comfyui"} <= set(seen)


def test_the_module_cache_is_the_one_every_job_reads(bridge, monkeypatch):
    """``bridge._MODULES`` is always the lookup's dict, also after a test swapped in a fresh one."""
    assert bridge._MODULES is bridge.modules._MODULES
    monkeypatch.setattr(bridge.modules, "_MODULES", {"folder_paths": types.SimpleNamespace()})
    assert bridge._MODULES is bridge.modules._MODULES and bridge.in_comfyui()
    monkeypatch.setitem(bridge._MODULES, "server", types.SimpleNamespace(
        PromptServer=types.SimpleNamespace(instance="the server")))
    assert bridge.server._prompt_server() == "the server"
    with pytest.raises(AttributeError):
        bridge.no_such_name


# ----------------------------------------------------------------------------- model management


def test_no_model_management_outside_comfyui(bridge):
    module = torch.nn.Linear(2, 2)
    assert bridge.model_patcher(module, torch.device("cpu"), torch.device("cpu")) is None
    bridge.load_models([None], memory_required=1 << 30, full=True)  # nothing to do, no error
    assert bridge.loaded_models() == []
    dropped = []
    assert bridge.unload_model(None, drop=lambda: dropped.append(1)) is False and dropped == [1]
    assert bridge.unload_model(None) is False
    assert bridge.cuda_api() is None


class FakeModelPatcher:
    """The part of comfy.model_patcher.ModelPatcher the bridge relies on, recording unpatch/detach calls."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.calls = []

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        self.calls.append(("unpatch_model", device_to, unpatch_weights))
        if device_to is not None:
            self.model.to(device_to)  # what ComfyUI's unpatch does: the weights go home
            self.model.device = device_to

    def detach(self, unpatch_all=True):  # ComfyUI's detach: unpatch (weights home) and forget
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model


class FakeManagement:
    """comfy.model_management's loaded-model list and the calls the bridge makes into it."""

    def __init__(self):
        self.current_loaded_models, self.calls = [], []

    def load_models_gpu(self, models, memory_required=0, force_full_load=False):
        self.calls.append(("load_models_gpu", list(models), memory_required, force_full_load))
        for m in models:
            if not any(e.model is m for e in self.current_loaded_models):
                self.current_loaded_models.insert(0, types.SimpleNamespace(model=m, device=m.load_device))

    def loaded_models(self):
        return [e.model for e in self.current_loaded_models]

    def free_memory(self, memory_required, device, keep_loaded=()):
        self.calls.append(("free_memory", memory_required, device, [e.model for e in keep_loaded]))
        for entry in list(self.current_loaded_models):
            if entry.device == device and not any(entry is k for k in keep_loaded):
                entry.model.detach()
                self.current_loaded_models.remove(entry)


@pytest.fixture
def fake_comfy(bridge, monkeypatch):
    """The bridge inside a fake ComfyUI: model_management and model_patcher (patcher classes made afresh)."""
    mm = FakeManagement()
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", mm)
    monkeypatch.setitem(bridge._MODULES, "comfy.model_patcher", types.SimpleNamespace(ModelPatcher=FakeModelPatcher))
    return mm


class Container(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)


def test_model_patcher_is_comfyuis_with_the_module_size(bridge, fake_comfy):
    module = Container()
    patcher = bridge.model_patcher(module, "cpu", torch.device("cpu"))
    assert isinstance(patcher, FakeModelPatcher) and patcher.model is module
    assert patcher.size == (4 * 3 + 3 + 3 + 3) * 4 == bridge.module_bytes(module)
    assert patcher.load_device == patcher.offload_device == torch.device("cpu")
    bridge.load_models([patcher, None], memory_required=123.0, full=True)
    assert fake_comfy.calls == [("load_models_gpu", [patcher], 123, True)]
    assert bridge.loaded_models() == [patcher]


def test_unload_without_drop_moves_home_and_with_drop_forgets_then_drops(bridge, fake_comfy, monkeypatch):
    module, other = Container(), Container()
    patcher = bridge.model_patcher(module, "cpu", "cpu")
    kept = bridge.model_patcher(other, "cpu", "cpu")
    bridge.load_models([patcher, kept])
    moves = []
    monkeypatch.setattr(module, "to", lambda *a, **k: moves.append(a) or module)  # the copy home, if any

    assert bridge.unload_model(patcher) is True  # an ordinary unload: ComfyUI's unpatch copies home
    assert patcher.calls == [("unpatch_model", torch.device("cpu"), True)] and moves == [(torch.device("cpu"),)]
    assert fake_comfy.calls[-1] == ("free_memory", 1e30, torch.device("cpu"), [kept])
    assert bridge.loaded_models() == [kept]

    bridge.load_models([patcher])
    patcher.calls.clear(), moves.clear()
    dropped = []
    assert bridge.unload_model(patcher, drop=lambda: dropped.append(module.device)) is True
    assert patcher.calls == [("unpatch_model", None, True)]  # ComfyUI forgets the placement, no copy
    assert moves == [] and dropped == [torch.device("cpu")] and module.device == torch.device("cpu")
    assert patcher.stepvideo_drop is None and bridge.loaded_models() == [kept]  # the drop was for this unload only
    assert other.a.weight.device.type == "cpu"

    dropped.clear()
    assert bridge.unload_model(patcher, drop=lambda: dropped.append("direct")) is False  # not loaded: dropped anyway
    assert dropped == ["direct"]


# ----------------------------------------------------------------------------- pinned memory


class BudgetManagement:
    """comfy.model_management's pinning: ``pin_memory`` within ``MAX_PINNED_MEMORY``, recording what it is asked."""

    def __init__(self, budget):
        self.MAX_PINNED_MEMORY, self.TOTAL_PINNED_MEMORY = budget, 0
        self.asked, self.pinned = [], set()

    def pin_memory(self, tensor):
        self.asked.append(tensor)
        if self.MAX_PINNED_MEMORY <= 0 or self.TOTAL_PINNED_MEMORY + tensor.nbytes > self.MAX_PINNED_MEMORY:
            return False
        self.TOTAL_PINNED_MEMORY += tensor.nbytes
        self.pinned.add(tensor.data_ptr())
        return True


def cpu_pinned_cuda(bridge, mm):
    """The bridge's ComfyPinnedCuda with the stream/event calls made no-ops, so the "cuda" transport runs
    on the CPU (copies real); only ``pin`` (the bridge's) and ``is_pinned`` (asks the fake) matter here."""

    class Null:
        def record(self, *args):
            pass

        def wait_event(self, event):
            pass

        def synchronize(self):
            pass

    class CpuStreams(bridge.ComfyPinnedCuda):
        def current_device(self):
            return 0

        def new_stream(self, device):
            return Null()

        def new_event(self):
            return Null()

        def current_stream(self, device):
            return Null()

        def stream(self, stream):
            import contextlib
            return contextlib.nullcontext()

        def copy_(self, dst, src):
            dst.copy_(src)

        def is_pinned(self, tensor):
            return tensor.data_ptr() in mm.pinned

    return CpuStreams(mm)


def run_streamed(model, api, blocks_on_device=1):
    """One model call with BlockStreamer's "cuda" transport under ``api``; returns the output."""
    from stepvideo_core.offload import BlockStreamer
    from tests.core.offload.test_streamer_cuda_order import inputs_for

    with torch.inference_mode(), BlockStreamer(model, "cpu", blocks_on_device, mode="cuda", cuda_api=api):
        return model(**inputs_for(0))


def block_tensors(block):
    return [t for t in list(block.parameters()) + list(block.buffers())]


@pytest.mark.usefixtures("one_thread")
def test_streamed_blocks_are_pinned_through_comfyuis_budget(bridge, monkeypatch):
    """Only the streamed blocks' home tensors go to comfy.model_management.pin_memory, pinned in place (the
    homes stay the same memory), once: a second run asks nothing; the output is the unstreamed one."""
    from tests.core.sampling.conftest import tiny_model
    from tests.core.offload.test_streamer_cuda_order import FIVE, inputs_for

    mm = BudgetManagement(budget=1 << 40)
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", mm)
    api = bridge.cuda_api()
    assert isinstance(api, bridge.ComfyPinnedCuda) and api.mm is mm
    model = tiny_model(torch.float32, config=FIVE)
    with torch.inference_mode():
        expected = model(**inputs_for(0))
    streamed = list(model.transformer_blocks)[2:]
    homes = [t.data_ptr() for b in streamed for t in block_tensors(b)]
    others = {t.data_ptr() for b in list(model.transformer_blocks)[:2] for t in block_tensors(b)}

    api = cpu_pinned_cuda(bridge, mm)
    out = run_streamed(model, api, blocks_on_device=2)
    assert sorted(t.data_ptr() for t in mm.asked) == sorted(homes) and not others & mm.pinned
    assert [t.data_ptr() for b in streamed for t in block_tensors(b)] == homes  # pinned in place, still home
    assert api.pinned == len(homes) and api.refused == 0
    assert mm.TOTAL_PINNED_MEMORY == sum(t.nbytes for b in streamed for t in block_tensors(b))
    assert torch.equal(out, expected)
    mm.asked.clear()
    run_streamed(model, cpu_pinned_cuda(bridge, mm), blocks_on_device=2)
    assert mm.asked == []  # pinned once, kept


@pytest.mark.usefixtures("one_thread")
def test_a_refused_pin_streams_from_pageable_memory_with_one_log_line(bridge, caplog):
    from tests.core.sampling.conftest import tiny_model
    from tests.core.offload.test_streamer_cuda_order import FIVE, inputs_for

    model = tiny_model(torch.float32, config=FIVE)
    with torch.inference_mode():
        expected = model(**inputs_for(0))
    first = block_tensors(list(model.transformer_blocks)[1])
    mm = BudgetManagement(budget=sum(t.nbytes for t in first))  # room for block 1 only
    api = cpu_pinned_cuda(bridge, mm)
    with caplog.at_level(logging.INFO, logger="StepVideo"):
        out = run_streamed(model, api, blocks_on_device=1)
    assert api.pinned == len(first) and api.refused == 3 * len(first) and len(mm.asked) == 4 * len(first)
    assert torch.equal(out, expected)
    lines = [r for r in caplog.records if "pageable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "budget is used up" in lines[0].getMessage()

    off = BudgetManagement(budget=-1)  # --disable-pinned-memory, or no CUDA: nothing pinned, said once at INFO
    caplog.clear()
    api = cpu_pinned_cuda(bridge, off)
    with caplog.at_level(logging.INFO, logger="StepVideo"):
        assert torch.equal(run_streamed(model, api, blocks_on_device=1), expected)
    lines = [r for r in caplog.records if "pageable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "is off" in lines[0].getMessage()
    assert api.pinned == 0 and api.refused == 4 * len(first)


def test_sampler_node_hands_the_bridge_cuda_api_to_the_streamer(bridge, sampler_mod, types_mod, dit, fake_gpu,
                                                                 sample_calls, monkeypatch):
    from stepvideo_core.offload.planner import GiB
    from stepvideo_core.offload.streamer import TorchCuda
    from tests.core.sampling.conftest import conditioning
    from tests.nodes.test_sampler_node import run

    sentinel = TorchCuda()
    monkeypatch.setattr(bridge, "cuda_api", lambda: sentinel)
    fake_gpu(80 * GiB)
    handle = types_mod.StepVideoModelHandle(transformer=dit, dtype=torch.float32, device=torch.device("cuda", 0),
                                            offload_device=torch.device("cpu"), attention="sdpa",
                                            source=__import__("pathlib").Path("tiny"), blocks_on_device="1")
    run(sampler_mod, handle, conditioning(1), conditioning(2))
    call = sample_calls[-1]
    assert call["cuda_api"] is sentinel and call["streamer"].cuda is sentinel
