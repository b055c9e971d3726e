"""Model management: handing the pack's models to ComfyUI, which loads, accounts for and evicts them.

Inside ComfyUI a module gets a ``ModelPatcher`` (:func:`model_patcher`, :func:`kept_weights_patcher`)
and ``comfy.model_management`` places it (:func:`load_models`), lists it (:func:`loaded_models`) and
takes it back (:func:`unload_model`, or any eviction of ComfyUI's own). Outside ComfyUI there is no
patcher (None), loading and listing do nothing, and the nodes place their weights themselves.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .modules import _comfy


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s state (parameters and persistent buffers): the size ComfyUI accounts for it."""
    return sum(t.nbytes for t in module.state_dict(keep_vars=True).values())


def _has_meta(module: torch.nn.Module) -> bool:
    """True when some weight of `module` was dropped (a meta tensor: nothing to copy anywhere)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@functools.lru_cache(maxsize=None)
def _patcher_class(base: type) -> type:
    """ComfyUI's plain ``ModelPatcher`` (`base`), able to drop its weights on unload instead of copying them home.

    The plain patcher, not ``CoreModelPatcher``: inside ComfyUI with dynamic VRAM that is
    ``ModelPatcherDynamic``, which loads weights on demand through comfy.ops' casting layers;
    the pack's modules are plain torch modules that compute with the weights where they are
    (the text encoder streams the layers ComfyUI left in RAM itself).
    """

    class StepVideoModelPatcher(base):
        """A ``ModelPatcher`` for the pack's modules; :func:`unload_model` may set ``stepvideo_drop``, and
        ``stepvideo_release`` is a drop for every unload (the sampler's kept weights, :func:`kept_weights_patcher`)."""

        stepvideo_drop: Optional[Callable[[], object]] = None
        stepvideo_release: Optional[Callable[[], object]] = None

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            drop = self.stepvideo_drop if self.stepvideo_drop is not None else self.stepvideo_release
            if not unpatch_weights or (drop is None and not _has_meta(self.model)):
                return super().unpatch_model(device_to, unpatch_weights)
            # Forget ComfyUI's placement without the copy to the offload device (39 GB of RAM for
            # a resident Step-LLM), then drop the weights wherever they are. Weights dropped
            # already (meta tensors) cannot be copied at all: ComfyUI's eviction must not fail.
            result = super().unpatch_model(None, unpatch_weights)
            if drop is not None:
                drop()
            self.model.device = self.offload_device
            return result

    return StepVideoModelPatcher


def model_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """Return a ComfyUI ``ModelPatcher`` owning `module`, or None outside ComfyUI.

    With it ComfyUI's model management knows the module: :func:`load_models` places it on
    `load_device` (after freeing VRAM for it), ``comfy.model_management.free_memory``,
    ``unload_all_models`` and the UI's "unload models" move it back to `offload_device`, and
    ComfyUI's caches treat an output holding it (as ``.patcher``) as a model. `module` must
    accept new attributes (ComfyUI keeps its bookkeeping on it): pass a container module.
    """
    mp = _comfy("comfy.model_patcher")
    if mp is None:
        return None
    return _patcher_class(mp.ModelPatcher)(module, load_device=torch.device(load_device),
                              offload_device=torch.device(offload_device), size=module_bytes(module))


class KeptWeightsModule(torch.nn.Module):
    """The DiT's resident weights kept on the GPU between sampler runs, as the module ComfyUI manages.

    A container without tensors of its own: the device copies live in the core's
    :class:`~stepvideo_core.offload.kept.KeptWeights` (``kept``), whose size the patcher reports
    (:func:`set_managed_size`). ComfyUI cannot move them anywhere: unloading it releases them (the
    home copies never left RAM), so loading another model, "unload models" or ``free_memory``
    evicts them like any model and the next run uploads them again.
    """

    def __init__(self, kept):
        super().__init__()
        self.kept = kept


def manages_models() -> bool:
    """True inside ComfyUI, whose model management can own (and evict) the pack's models (:func:`model_patcher`)."""
    return _comfy("comfy.model_patcher") is not None


def kept_weights_patcher(kept, load_device: torch.device, offload_device: torch.device):
    """A ComfyUI ``ModelPatcher`` standing for `kept` (a KeptWeights), which every unload releases; None outside ComfyUI.

    Register it with :func:`load_models` before the run that fills `kept`, sized with
    :func:`set_managed_size`, so ComfyUI accounts for the memory and can take it back.
    """
    mp = _comfy("comfy.model_patcher")
    if mp is None:
        return None
    patcher = _patcher_class(mp.ModelPatcher)(KeptWeightsModule(kept), load_device=torch.device(load_device),
                                              offload_device=torch.device(offload_device), size=kept.nbytes)
    patcher.stepvideo_release = kept.release
    return patcher


def set_managed_size(patcher, nbytes: int) -> None:
    """Tell ComfyUI that `patcher` (a :func:`kept_weights_patcher`) holds `nbytes` on its device now, loaded or not.

    Its module has no tensors of its own, so ComfyUI's figures are the ones set here: the size it
    frees room for when it loads the patcher, and, when it is loaded already, what it counts as loaded.
    """
    if patcher is None:
        return
    patcher.size = int(nbytes)
    mm = _comfy("comfy.model_management")
    if mm is not None and any(m.model is patcher for m in mm.current_loaded_models):
        patcher.model.model_loaded_weight_memory = int(nbytes)


def load_models(patchers, memory_required: int = 0, full: bool = False) -> None:
    """Have ComfyUI place `patchers` on their load devices before a compute (``load_models_gpu``).

    ComfyUI first frees VRAM for them plus `memory_required` bytes of working memory,
    unloading other models as needed. `full` loads every weight; otherwise, when VRAM is
    short, ComfyUI may leave part of the weights on the offload device (the caller must then
    bring them over itself, as the text encoder's streaming does). They stay loaded after the
    compute, until ComfyUI needs the memory. None entries and calls outside ComfyUI do nothing.
    """
    patchers = [p for p in patchers if p is not None]
    mm = _comfy("comfy.model_management")
    if mm is None or not patchers:
        return
    mm.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=bool(full))


def loaded_models() -> list:
    """The patchers ComfyUI has loaded now (``comfy.model_management.loaded_models()``); [] outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    return [] if mm is None else list(mm.loaded_models())


def unload_model(patcher, drop: Optional[Callable[[], object]] = None) -> bool:
    """Take `patcher` out of ComfyUI's loaded models; returns True when it was loaded.

    Without `drop` its weights go back to the offload device, as any ComfyUI unload does.
    With `drop`, ComfyUI forgets where it placed them without copying them home and `drop()`
    removes them (the text encoder's release); `drop()` is called also when ComfyUI did not
    hold the model, and outside ComfyUI (`patcher` None).
    """
    mm = _comfy("comfy.model_management")
    entry = None
    if mm is not None and patcher is not None:
        entry = next((m for m in mm.current_loaded_models if m.model is patcher), None)
    if entry is None:
        if drop is not None:
            drop()
        return False
    others = [m for m in mm.current_loaded_models if m is not entry]
    patcher.stepvideo_drop = drop
    try:
        mm.free_memory(1e30, entry.device, keep_loaded=others)
    finally:
        patcher.stepvideo_drop = None
    return True
