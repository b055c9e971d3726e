"""The sampler's kept resident weights under ComfyUI's real model management (in-process, ``--cpu`` without a GPU).

On the CPU the sampler keeps nothing (weights compute where they rest), so the patcher the sampler
registers on a GPU is exercised here directly with ComfyUI's own code: ``load_models_gpu`` accepts it
(a container with no tensors, sized by the pack) and reports its size as loaded; every way ComfyUI frees
memory -- ``free_memory`` for another model, ``unload_all_models`` -- releases the device copies (no copy
home: the home weights never left RAM), after which it can be loaded again.  Skipped without
COMFYUI_DIR, failed instead under CI=true.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.e2e.test_managed_memory import comfy, entry_of  # noqa: F401 - the fixture, ComfyUI's modules


@pytest.fixture
def parts(pack, comfy, monkeypatch):  # noqa: F811 - the imported fixture
    mm, _, _ = comfy
    bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
    monkeypatch.setattr(bridge.modules, "_MODULES", {})
    kept_mod = sys.modules[f"{pack.__name__}.stepvideo_core.offload.kept"]
    mm.unload_all_models()
    yield mm, bridge, kept_mod
    mm.unload_all_models()


def filled(kept_mod, nbytes=3 << 20):
    owner = torch.nn.Linear(4, 4)
    kept = kept_mod.KeptWeights(torch.device("cpu"))
    kept.keep(owner, "weight", owner.weight.data, torch.zeros(nbytes, dtype=torch.uint8))
    return kept, owner


@pytest.mark.parametrize("evict", ["free_memory", "unload_all_models"])
def test_comfyui_loads_accounts_for_and_evicts_the_kept_weights(parts, evict):
    mm, bridge, kept_mod = parts
    kept, owner = filled(kept_mod)
    cpu = torch.device("cpu")
    patcher = bridge.kept_weights_patcher(kept, cpu, cpu)
    assert bridge.manages_models() and patcher is not None
    bridge.set_managed_size(patcher, kept.nbytes)
    bridge.load_models([patcher], full=True)
    entry = entry_of(mm, patcher)
    assert entry is not None and entry.model_memory() == kept.nbytes == entry.model_loaded_memory()
    bridge.set_managed_size(patcher, 5 << 20)  # a later plan keeps more: ComfyUI's figures follow
    assert entry.model_memory() == entry.model_loaded_memory() == 5 << 20

    if evict == "free_memory":
        mm.free_memory(1e30, cpu)  # another model asking for the memory
    else:
        mm.unload_all_models()     # "unload models" in the UI, POST /free
    assert entry_of(mm, patcher) is None and kept.count == 0 and kept.releases == 1
    assert owner.weight.device == cpu  # the home weights are untouched

    kept.keep(owner, "weight", owner.weight.data, torch.zeros(1 << 20, dtype=torch.uint8))
    bridge.set_managed_size(patcher, kept.nbytes)
    bridge.load_models([patcher], full=True)  # the next run registers again
    assert entry_of(mm, patcher).model_loaded_memory() == 1 << 20


def test_free_memory_for_a_run_keeps_the_sampler_s_own_weights(parts):
    mm, bridge, kept_mod = parts
    kept, _ = filled(kept_mod)
    other_kept, _ = filled(kept_mod)
    cpu = torch.device("cpu")
    ours = bridge.kept_weights_patcher(kept, cpu, cpu)
    other = bridge.kept_weights_patcher(other_kept, cpu, cpu)
    for patcher in (ours, other):
        bridge.set_managed_size(patcher, 3 << 20)
        bridge.load_models([patcher], full=True)
    bridge.free_memory(1e30, cpu, keep=[ours])
    assert entry_of(mm, ours) is not None and kept.count == 1
    assert entry_of(mm, other) is None and other_kept.count == 0
