"""The pack's only door into ComfyUI internals: one module per job, every public name re-exported here.

Node code imports this package (``from . import comfy_bridge as bridge``) and calls ``bridge.<name>``.
Inside ComfyUI each call goes to ComfyUI's own machinery; in plain Python (tests, scripts) each
degrades to a simple stand-in, so node code runs anywhere. Which module does what:

- :mod:`.modules` -- the lazy, cached lookup of ComfyUI's modules (``_comfy``, ``_MODULES``,
  :func:`in_comfyui`); outside ComfyUI every lookup answers None;
- :mod:`.folders` -- model folders and the step cache's folders: ComfyUI's ``folder_paths``, then
  ``STEPVIDEO_MODELS_DIR`` (one or more roots separated by ``os.pathsep``, each holding
  ``diffusion_models/``, ``vae/``, ``text_encoders/``, ``loras/``), which alone remains outside ComfyUI;
- :mod:`.progress` -- progress bar, interrupts and step previews: ComfyUI's progress bar, interrupt
  and ``--preview-method``; outside ComfyUI logged progress, a settable interrupt flag
  (:func:`request_interrupt`) and previews on;
- :mod:`.memory` -- devices, free VRAM, freeing memory, :func:`device_memory` and the block
  streamer's pinning (:func:`cuda_api`): ``comfy.model_management``'s; outside ComfyUI CUDA when
  available, else the CPU, the driver's free-memory figure and torch's own pinning;
- :mod:`.models` -- model management (:func:`model_patcher`, :func:`kept_weights_patcher`,
  :func:`load_models`, :func:`unload_model`): ComfyUI's ``ModelPatcher`` and loaded-model list;
  outside ComfyUI no patcher, and the nodes place weights themselves;
- :mod:`.server` -- the pack's JSON routes on ComfyUI's web server (:func:`add_route`); nothing
  outside ComfyUI.

Faking ComfyUI in tests: ``monkeypatch.setitem(comfy_bridge._MODULES, name, fake)`` (``None`` forces
"absent"); ``comfy_bridge._MODULES`` is always the dict the lookups read, even after a test replaced it
with ``monkeypatch.setattr(comfy_bridge.modules, "_MODULES", {})``. Patching a function with
``monkeypatch.setattr(comfy_bridge, name, fake)`` reaches every node (they call ``bridge.<name>``), but
not the bridge's own calls inside one module (``device_memory`` calls ``memory.free_vram``): patch the
module for those, and for module state (``progress._interrupt_flag``, ``server._ROUTES``).
"""

from __future__ import annotations

from . import folders, memory, models, modules, progress, server
from .folders import (ENV_MODELS_DIR, MODEL_KINDS, OFFICIAL_SUBFOLDER, STEP_CACHE_FOLDER, is_official_root,
                      is_sharded_folder, list_model_entries, model_dirs, resolve_model_path, step_cache_dirs)
from .memory import (ComfyPinnedCuda, cuda_api, device_memory, empty_cache, free_memory, free_vram,
                     offload_device, torch_device)
from .models import (KeptWeightsModule, kept_weights_patcher, load_models, loaded_models, manages_models,
                     model_patcher, module_bytes, set_managed_size, unload_model)
from .modules import _comfy, in_comfyui
from .progress import (PREVIEW_MAX_SIZE, LogProgress, StepVideoInterrupted, check_interrupt, interrupt_requested,
                       is_interrupt, preview_image, preview_max_size, preview_method, previews_enabled,
                       progress_bar, request_interrupt)
from .server import add_route

__all__ = [
    "folders", "memory", "models", "modules", "progress", "server",
    "ENV_MODELS_DIR", "MODEL_KINDS", "OFFICIAL_SUBFOLDER", "STEP_CACHE_FOLDER", "is_official_root",
    "is_sharded_folder", "list_model_entries", "model_dirs", "resolve_model_path", "step_cache_dirs",
    "ComfyPinnedCuda", "cuda_api", "device_memory", "empty_cache", "free_memory", "free_vram",
    "offload_device", "torch_device",
    "KeptWeightsModule", "kept_weights_patcher", "load_models", "loaded_models", "manages_models",
    "model_patcher", "module_bytes", "set_managed_size", "unload_model",
    "_comfy", "in_comfyui",
    "PREVIEW_MAX_SIZE", "LogProgress", "StepVideoInterrupted", "check_interrupt", "interrupt_requested",
    "is_interrupt", "preview_image", "preview_max_size", "preview_method", "previews_enabled", "progress_bar", "request_interrupt",
    "add_route",
]


def __getattr__(name: str):
    """Return ``modules._MODULES`` for ``_MODULES``: looked up on each access, so it is the dict in use."""
    if name == "_MODULES":
        return modules._MODULES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
