"""The one module of the pack that touches ComfyUI internals.

Node code asks this module for model folders, progress bars, interrupt checks, devices
and memory release. Inside ComfyUI each call goes to ComfyUI's own machinery
(``folder_paths``, ``comfy.utils``, ``comfy.model_management``); in plain Python (tests,
scripts) each degrades to a simple stand-in, so node code runs anywhere:

- model folders come from ``STEPVIDEO_MODELS_DIR`` (one or more roots separated by
  ``os.pathsep``, each holding ``diffusion_models/``, ``vae/``, ``text_encoders/``,
  ``loras/``); inside ComfyUI those roots are searched after ComfyUI's own folders;
- progress is logged instead of sent to the browser;
- interrupts come from :func:`request_interrupt` (a flag tests can set);
- the device is CUDA when available, else the CPU;
- model management (:func:`model_patcher`, :func:`load_models`, :func:`unload_model`) is
  ComfyUI's own; outside ComfyUI there is no patcher and the nodes place weights themselves;
- the block streamer pins host memory through ComfyUI's pinned-memory budget
  (:func:`cuda_api`); outside ComfyUI with torch's own pinning.

ComfyUI modules are imported lazily and looked up through :func:`_comfy`, so tests can
swap them for fakes with ``monkeypatch.setitem(comfy_bridge._MODULES, name, fake)``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from ..stepvideo_core.checkpoint import SAFETENSORS_SUFFIXES
from ..stepvideo_core.offload.streamer import TorchCuda

log = logging.getLogger("StepVideo")

ENV_MODELS_DIR = "STEPVIDEO_MODELS_DIR"
MODEL_KINDS = ("diffusion_models", "vae", "text_encoders", "loras")

# For each folder kind, the subfolder that an official `stepvideo-t2v/` root keeps that
# component in; such a root is listed as one entry of that kind.
OFFICIAL_SUBFOLDER = {"diffusion_models": "transformer"}

_MISSING = object()
_MODULES: dict = {}


def _comfy(name: str):
    """Return the ComfyUI module `name` (e.g. "folder_paths"), or None outside ComfyUI.

    Exists so every ComfyUI import of the pack goes through one cached, failure-tolerant
    door. Only ImportError means "not inside ComfyUI"; any other error is a real bug and
    propagates.
    """
    mod = _MODULES.get(name, _MISSING)
    if mod is _MISSING:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            mod = None
        _MODULES[name] = mod
    return mod


def in_comfyui() -> bool:
    """Return True when ComfyUI's ``folder_paths`` is importable, i.e. we run inside ComfyUI."""
    return _comfy("folder_paths") is not None


# --------------------------------------------------------------------------- folders


def model_dirs(kind: str) -> list[Path]:
    """Return the existing directories searched for models of `kind`, in priority order.

    ComfyUI's configured folders come first (including extra_model_paths.yaml entries),
    then ``$STEPVIDEO_MODELS_DIR/<kind>`` for each root in that variable.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model folder kind {kind!r}; expected one of {MODEL_KINDS}")
    candidates: list[Path] = []
    fp = _comfy("folder_paths")
    if fp is not None:
        try:
            candidates += [Path(p) for p in fp.get_folder_paths(kind)]
        except KeyError:  # a ComfyUI too old to know this folder kind
            pass
    for root in os.environ.get(ENV_MODELS_DIR, "").split(os.pathsep):
        if root.strip():
            candidates.append(Path(root.strip()).expanduser() / kind)
    seen, dirs = set(), []
    for d in candidates:
        key = os.path.realpath(d)
        if key not in seen and d.is_dir():
            seen.add(key)
            dirs.append(d)
    return dirs


def is_sharded_folder(path: Path) -> bool:
    """Return True if `path` is a model folder: ``config.json`` plus a ``*.safetensors.index.json``.

    Such a folder (e.g. the official ``transformer/``) is one model, not many files.
    """
    return (path / "config.json").is_file() and any(path.glob("*.safetensors.index.json"))


def is_official_root(path: Path, kind: str) -> bool:
    """Return True if `path` is an official release root holding the `kind` component.

    For ``diffusion_models`` that is a folder (e.g. ``stepvideo-t2v/``) whose
    ``transformer/`` subfolder is a sharded model folder.
    """
    sub = OFFICIAL_SUBFOLDER.get(kind)
    return sub is not None and is_sharded_folder(path / sub)


def _entries_under(base: Path, kind: str) -> list[str]:
    """Return the model entries below `base` as ``/``-separated relative names.

    Official roots and sharded folders count as one entry each and are not descended
    into; elsewhere every weight file is its own entry.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        here = Path(dirpath)
        if here != base and (is_official_root(here, kind) or is_sharded_folder(here)):
            found.append(here.relative_to(base).as_posix())
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(SAFETENSORS_SUFFIXES):
                found.append((here / name).relative_to(base).as_posix())
    return found


def list_model_entries(kind: str) -> list[str]:
    """Return the sorted, de-duplicated model entries of `kind` across all its folders.

    This is what loader combos show. An entry is a single weight file
    (``sub/model.safetensors``) or a model folder (``stepvideo-t2v``,
    ``stepvideo-t2v/transformer``); resolve it with :func:`resolve_model_path`.
    """
    names = set()
    for base in model_dirs(kind):
        names.update(_entries_under(base, kind))
    return sorted(names, key=str.lower)


def resolve_model_path(kind: str, name: str) -> Path:
    """Return the absolute path of entry `name` of `kind` (first folder that has it).

    Raises FileNotFoundError naming every folder searched, so a user whose file is in the
    wrong place sees where the pack looked. Names that climb out of a folder are refused.
    """
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise FileNotFoundError(f"invalid {kind} entry name {name!r}")
    dirs = model_dirs(kind)
    for base in dirs:
        candidate = base / rel
        if candidate.exists():
            return candidate.resolve()
    where = ", ".join(str(d) for d in dirs) or (
        f"no {kind} folder found (inside ComfyUI use models/{kind}; "
        f"outside, set {ENV_MODELS_DIR} to a folder containing {kind}/)"
    )
    raise FileNotFoundError(f"StepVideo: {kind} entry {name!r} not found; searched: {where}")


STEP_CACHE_FOLDER = "stepvideo_cache"  # where the sampler's calibrated step cache looks for its JSON files


def step_cache_dirs() -> list[Path]:
    """The folders the sampler's calibrated step cache reads ``*.json`` calibrations from, in order.

    Inside ComfyUI: ``models/stepvideo_cache/`` (``folder_paths.models_dir``) and any
    ``stepvideo_cache`` paths of extra_model_paths.yaml; then ``$STEPVIDEO_MODELS_DIR/stepvideo_cache``
    for each root of that variable.  Folders that do not exist are listed too (so a message can say
    where to put a file); reading skips them.
    """
    candidates: list[Path] = []
    fp = _comfy("folder_paths")
    if fp is not None:
        try:
            candidates += [Path(p) for p in fp.get_folder_paths(STEP_CACHE_FOLDER)]
        except KeyError:  # not registered (the usual case): ComfyUI's models folder
            pass
        models_dir = getattr(fp, "models_dir", None)
        if models_dir:
            candidates.append(Path(models_dir) / STEP_CACHE_FOLDER)
    for root in os.environ.get(ENV_MODELS_DIR, "").split(os.pathsep):
        if root.strip():
            candidates.append(Path(root.strip()).expanduser() / STEP_CACHE_FOLDER)
    seen, dirs = set(), []
    for d in candidates:
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            dirs.append(d)
    return dirs


# --------------------------------------------------------------------------- progress


class LogProgress:
    """Progress stand-in used outside ComfyUI: same methods as ``comfy.utils.ProgressBar``.

    Logs at most about ten lines per run, so long loops stay readable in a terminal.
    """

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.current = 0
        self._last_logged = -1

    def update_absolute(self, value, total=None, preview=None):
        """Set progress to `value` (of `total` if given); `preview` is ignored here."""
        if total is not None:
            self.total = max(int(total), 1)
        self.current = min(int(value), self.total)
        tenth = self.current * 10 // self.total
        if tenth != self._last_logged:
            self._last_logged = tenth
            log.info("StepVideo progress %d/%d", self.current, self.total)

    def update(self, value=1):
        """Advance progress by `value` steps."""
        self.update_absolute(self.current + value)


def progress_bar(total: int):
    """Return a progress object with ``update(n)`` and ``update_absolute(value, total, preview)``.

    Inside ComfyUI it is ``comfy.utils.ProgressBar`` (browser progress, previews and, on
    every update, an interrupt check); elsewhere a :class:`LogProgress`.
    """
    utils = _comfy("comfy.utils")
    if utils is not None:
        return utils.ProgressBar(total)
    return LogProgress(total)


# --------------------------------------------------------------------------- interrupts


class StepVideoInterrupted(Exception):
    """Raised by :func:`check_interrupt` outside ComfyUI after :func:`request_interrupt`."""


_interrupt_flag = False


def request_interrupt(value: bool = True) -> None:
    """Set (or with False, clear) the stand-in interrupt flag used outside ComfyUI."""
    global _interrupt_flag
    _interrupt_flag = bool(value)


def interrupt_requested() -> bool:
    """Return True if the user asked to stop; polls only (core's ``should_stop`` callback)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return bool(mm.processing_interrupted())
    return _interrupt_flag


def check_interrupt() -> None:
    """Raise if the user asked to stop: ComfyUI's own exception inside ComfyUI, else
    :class:`StepVideoInterrupted` (the flag is cleared when it fires)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
        return
    if _interrupt_flag:
        request_interrupt(False)
        raise StepVideoInterrupted("StepVideo: interrupted")


def is_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` is the host's interrupt: ComfyUI's ``InterruptProcessingException`` (which its
    progress bar raises, clearing the flag, on an update after an interrupt) or :class:`StepVideoInterrupted`."""
    mm = _comfy("comfy.model_management")
    kind = getattr(mm, "InterruptProcessingException", None) if mm is not None else None
    return isinstance(exc, StepVideoInterrupted) or (isinstance(kind, type) and isinstance(exc, kind))


# --------------------------------------------------------------------------- devices


def torch_device() -> torch.device:
    """Return the compute device: ComfyUI's choice (honours ``--cpu``), else CUDA if present."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return torch.device(mm.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    """Return where weights rest when not computing: ComfyUI's unet offload device, else CPU."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return torch.device(mm.unet_offload_device())
    return torch.device("cpu")


def free_memory(required_bytes: int | None = None, device: torch.device | None = None, keep=()) -> None:
    """Release accelerator memory before a big load.

    Inside ComfyUI: evict ComfyUI-managed models (enough for `required_bytes` on `device`,
    or all of them) and empty the cache; the patchers in `keep` stay loaded (the sampler's own
    kept weights, which the coming run reuses). Elsewhere: collect garbage and empty the CUDA cache.
    """
    mm = _comfy("comfy.model_management")
    if mm is not None:
        if required_bytes is None:
            mm.unload_all_models()
        else:
            keep = [p for p in keep if p is not None]
            kept = [m for m in mm.current_loaded_models if any(m.model is p for p in keep)] if keep else []
            if kept:
                mm.free_memory(required_bytes, device or torch_device(), keep_loaded=kept)
            else:
                mm.free_memory(required_bytes, device or torch_device())
        mm.soft_empty_cache()
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_vram(device: torch.device | None = None) -> int | None:
    """Return the free memory of `device` in bytes, or None when it is not an accelerator.

    Inside ComfyUI this is ``comfy.model_management.get_free_memory`` (which counts memory
    PyTorch has cached but not used as free); elsewhere the CUDA driver's figure plus that
    cached-but-unused memory. Used by memory plans such as the text encoder's.
    """
    device = torch.device(device) if device is not None else torch_device()
    if device.type == "cpu":
        return None
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return int(mm.get_free_memory(device))
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return None


def empty_cache() -> None:
    """Hand cached-but-unused accelerator memory back (after a run), without unloading any model.

    Inside ComfyUI: ``comfy.model_management.soft_empty_cache()``; elsewhere the CUDA cache.
    """
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- model management


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


# --------------------------------------------------------------------------- pinned memory


class ComfyPinnedCuda(TorchCuda):
    """The block streamer's CUDA calls, with host pinning inside ComfyUI's pinned-memory budget.

    ``pin`` asks ``comfy.model_management.pin_memory``, which registers the tensor's own memory
    (no copy) and counts it against ``MAX_PINNED_MEMORY`` (evicting pins of ComfyUI's own models
    when it needs room). When ComfyUI refuses (budget exhausted, pinning disabled, no CUDA) the
    tensor stays in pageable memory: copies stay correct, only slower; one log line per run says so.
    """

    def __init__(self, mm):
        self.mm = mm
        self.pinned = 0          # tensors ComfyUI pinned for this run
        self.refused = 0         # tensors left in pageable memory
        self.refused_bytes = 0

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.mm.pin_memory(tensor):
            self.pinned += 1
            return tensor
        self.refused += 1
        self.refused_bytes += tensor.nbytes
        if self.refused == 1:
            budget = int(getattr(self.mm, "MAX_PINNED_MEMORY", 0) or 0)
            used = int(getattr(self.mm, "TOTAL_PINNED_MEMORY", 0) or 0)
            why = ("ComfyUI's pinned memory is off" if budget <= 0 else
                   f"ComfyUI's pinned-memory budget is used up: {used >> 20} of {budget >> 20} MiB")
            (log.warning if budget > 0 else log.info)(
                "StepVideo: streamed block weights stay in pageable memory (%s); copies are slower", why)
        return tensor


def cuda_api() -> Optional[TorchCuda]:
    """The ``cuda_api`` for the core's block streamer: inside ComfyUI a :class:`ComfyPinnedCuda`
    (pinning within ComfyUI's budget); None elsewhere (the core's default, torch's own pinning)."""
    mm = _comfy("comfy.model_management")
    if mm is None or not hasattr(mm, "pin_memory"):
        return None
    return ComfyPinnedCuda(mm)


# --------------------------------------------------------------------------- previews

PREVIEW_MAX_SIZE = 512


def preview_image(rgb):
    """Return a preview for ``ProgressBar.update_absolute(value, total, preview)``, or None.

    `rgb` is a uint8 tensor [h, w, 3]. ComfyUI takes ``("JPEG", PIL.Image, max_size)``;
    the image is enlarged (nearest) to about 256 px so a 34x62 latent preview is visible.
    Returns None when Pillow is missing (previews are optional).
    """
    try:
        from PIL import Image
    except ImportError:
        return None
    image = Image.fromarray(rgb.cpu().numpy())
    scale = max(1, 256 // max(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return ("JPEG", image, PREVIEW_MAX_SIZE)


# --------------------------------------------------------------------------- device memory


def device_memory(device: torch.device | None = None) -> dict:
    """Return what the memory plan needs to know about the compute device, JSON-friendly.

    Keys: ``type`` ("cuda", "cpu", ...), ``name`` (e.g. "NVIDIA GeForce RTX 4090"),
    ``free_bytes`` and ``total_bytes`` (None on the CPU, where there is no VRAM to plan),
    and ``freeable_bytes``: what this process's tensors occupy on a CUDA device right now --
    models ComfyUI keeps loaded (the sampler asks ComfyUI to unload them before it plans)
    and whatever a run in progress holds. ``free_bytes + freeable_bytes`` is then the memory
    a run can have, and it does not drop while a run holds the GPU.
    """
    device = torch.device(device) if device is not None else torch_device()
    info = {"type": device.type, "name": device.type, "free_bytes": None, "total_bytes": None,
            "freeable_bytes": 0}
    if device.type == "cpu":
        return info
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        info["name"] = torch.cuda.get_device_name(device)
        info["freeable_bytes"] = int(torch.cuda.memory_allocated(device))
    info["free_bytes"] = free_vram(device)
    mm = _comfy("comfy.model_management")
    if mm is not None:
        info["total_bytes"] = int(mm.get_total_memory(device))
    elif cuda:
        info["total_bytes"] = int(torch.cuda.mem_get_info(device)[1])
    return info


# --------------------------------------------------------------------------- server routes

_ROUTES: set = set()


def _prompt_server():
    """ComfyUI's running ``PromptServer`` instance, or None (plain Python, or a ComfyUI without a server).

    Only an already-imported ``server`` module counts: inside ComfyUI ``main.py`` has imported it
    before any pack loads, and importing it ourselves elsewhere would start ComfyUI's machinery.
    """
    mod = _MODULES.get("server", _MISSING)
    if mod is _MISSING:
        mod = sys.modules.get("server") if in_comfyui() else None
    prompt_server = getattr(mod, "PromptServer", None)
    return getattr(prompt_server, "instance", None)


def add_route(method: str, path: str, handler) -> bool:
    """Serve ``handler`` at ``path`` on ComfyUI's web server; returns True when registered.

    ``handler(query: dict[str, str]) -> (status: int, body: dict)`` is a plain function (run
    in a worker thread, so it may read files); the answer goes out as JSON. ComfyUI also
    serves every route under ``/api``, which is where the frontend's ``api.fetchApi`` asks.
    Outside ComfyUI (tests, scripts) nothing happens and False is returned; registering the
    same method and path twice is a no-op.
    """
    key = (method.upper(), path)
    server = _prompt_server()
    if server is None or key in _ROUTES:
        return False

    async def serve(request):
        from aiohttp import web  # ComfyUI's own web framework; present wherever a PromptServer runs

        loop = asyncio.get_running_loop()
        try:
            status, body = await loop.run_in_executor(None, handler, dict(request.rel_url.query))
        except Exception as exc:  # noqa: BLE001 - answer with the reason instead of a bare 500 page
            log.exception("StepVideo: %s %s failed", method, path)
            status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
        return web.json_response(body, status=status)

    server.routes.route(method.upper(), path)(serve)
    _ROUTES.add(key)
    return True
