"""StepVideoSampler keeps the DiT's resident weights on the GPU between runs, as a model ComfyUI manages.

Inside ComfyUI (faked here: model_management's loaded-model list and ModelPatcher, as in test_bridge.py)
on a GPU, the sampler hands the core sampler the transformer's KeptWeights, registers them with ComfyUI
(``load_models_gpu`` of a patcher sized to what the run keeps on the GPU), counts what an earlier run left
there as free memory for its plan and does not evict it to make room; ComfyUI evicting the patcher
releases the device copies.  Outside ComfyUI, or on the CPU, nothing is kept (nobody could evict it).
The streamer side -- a second run copies no resident weight -- is tests/core/offload/test_kept_weights.py.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from stepvideo_core.offload.planner import GiB
from tests.core.sampling.conftest import conditioning
from tests.nodes.test_bridge import FakeManagement, FakeModelPatcher
from tests.nodes.test_sampler_node import build_meta_30b, run

CUDA = torch.device("cuda", 0)


class GpuManagement(FakeManagement):
    """The fake model management with the calls the sampler makes on a GPU run (free VRAM, interrupts)."""

    def __init__(self, free):
        super().__init__()
        self.free = free

    def get_free_memory(self, device):
        return self.free

    def soft_empty_cache(self):
        pass

    def processing_interrupted(self):
        return False

    def throw_exception_if_processing_interrupted(self):
        pass


@pytest.fixture
def comfy(bridge, monkeypatch):
    mm = GpuManagement(free=80 * GiB)
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", mm)
    monkeypatch.setitem(bridge._MODULES, "comfy.model_patcher", types.SimpleNamespace(ModelPatcher=FakeModelPatcher))
    return mm


@pytest.fixture
def kept_mod(pack):
    return sys.modules[f"{pack.__name__}.stepvideo_core.offload.kept"]


@pytest.fixture
def planned(sampler_mod, monkeypatch):
    """The free bytes the node's ``make_room`` gave each GPU plan."""
    seen = []
    real = sampler_mod.make_room

    def spy(*args, **kwargs):
        room = real(*args, **kwargs)

        def recorded(need):
            seen.append(room(need))
            return seen[-1]

        return recorded

    monkeypatch.setattr(sampler_mod, "make_room", spy)
    return seen


def big_handle(types_mod, transformer, **kw):
    fields = dict(transformer=transformer, dtype=torch.bfloat16, device=CUDA, offload_device=torch.device("cpu"),
                  attention="sdpa", source=Path("30b"), weight_format="fp8_scaled", blocks_on_device="auto")
    fields.update(kw)
    return types_mod.StepVideoModelHandle(**fields)


def run_30b(sampler_mod, handle):
    return run(sampler_mod, handle, conditioning(1), conditioning(2), preset="Step-Video-T2V", width=992,
               height=544, frames=51, steps=1)


def test_a_gpu_run_in_comfyui_keeps_its_resident_weights_as_a_managed_model(sampler_mod, types_mod, kept_mod,
                                                                            comfy, sample_calls, planned):
    transformer = build_meta_30b()
    handle = big_handle(types_mod, transformer)
    run_30b(sampler_mod, handle)
    call = sample_calls[-1]
    kept = call["kept"]
    assert kept is kept_mod.kept_weights_of(transformer) and kept.device == CUDA
    loads = [c for c in comfy.calls if c[0] == "load_models_gpu"]
    (keeper,), _, full = loads[-1][1:]
    assert full is True and isinstance(keeper, FakeModelPatcher) and keeper.load_device == CUDA
    blocks = call["blocks_on_device"]
    assert keeper.size == kept_mod.resident_bytes(transformer, blocks, CUDA) > 0  # what this run keeps on the GPU
    assert bridge_loaded(sampler_mod, keeper)  # registered, and still loaded after the run

    # what the first run left on the GPU counts as free for the next plan, and is not evicted for it
    kept.keep(transformer, "scale_shift_table", transformer.scale_shift_table.data,
              torch.empty(1 << 20, dtype=torch.uint8))
    planned.clear()
    comfy.calls.clear()
    run_30b(sampler_mod, handle)
    assert planned[-1] == 80 * GiB + kept.nbytes
    frees = [c for c in comfy.calls if c[0] == "free_memory"]
    assert frees and all(keeper in c[3] for c in frees)  # keep_loaded: our own weights stay
    assert [c[1] for c in comfy.calls if c[0] == "load_models_gpu"] == [[keeper]]  # the same patcher, once
    assert kept.count == 1


def test_comfyui_evicting_the_patcher_releases_the_device_copies(sampler_mod, types_mod, comfy, sample_calls):
    transformer = build_meta_30b()
    run_30b(sampler_mod, big_handle(types_mod, transformer))
    kept = sample_calls[-1]["kept"]
    kept.keep(transformer, "scale_shift_table", transformer.scale_shift_table.data, torch.zeros(8))
    keeper = sampler_mod._KEEPERS[transformer]
    comfy.free_memory(1e30, CUDA)  # another model's load, "unload models": ComfyUI takes the memory back
    assert kept.count == 0 and kept.releases == 1 and not bridge_loaded(sampler_mod, keeper)
    assert keeper.calls == [("unpatch_model", None, True)]  # forgotten without a copy anywhere, then dropped
    run_30b(sampler_mod, big_handle(types_mod, transformer))  # the next run registers (and uploads) again
    assert bridge_loaded(sampler_mod, keeper) and sample_calls[-1]["kept"] is kept


def test_nothing_is_kept_outside_comfyui_or_on_the_cpu(sampler_mod, types_mod, kept_mod, base, fake_gpu,
                                                        sample_calls):
    fake_gpu(80 * GiB)  # a GPU, but no ComfyUI: nobody could evict kept weights
    transformer = build_meta_30b()
    run_30b(sampler_mod, big_handle(types_mod, transformer))
    assert sample_calls[-1]["kept"] is None and kept_mod.kept_weights_of(transformer) is None
    run(sampler_mod, base, conditioning(1), conditioning(2))  # the CPU: weights compute where they rest
    assert sample_calls[-1]["kept"] is None


def test_nothing_is_kept_on_the_cpu_inside_comfyui(sampler_mod, base, comfy, sample_calls):
    run(sampler_mod, base, conditioning(1), conditioning(2))
    assert sample_calls[-1]["kept"] is None and not [c for c in comfy.calls if c[0] == "load_models_gpu"]


def bridge_loaded(sampler_mod, patcher) -> bool:
    return any(p is patcher for p in sampler_mod.bridge.loaded_models())
