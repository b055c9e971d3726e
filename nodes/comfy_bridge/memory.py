"""Devices and memory: where the nodes compute, how much VRAM there is, and freeing it before a big load.

Inside ComfyUI the answers are ``comfy.model_management``'s (its device choice, honouring ``--cpu``;
its free-memory figure; evicting the models it manages; its pinned-memory budget for the block
streamer, :func:`cuda_api`). Outside ComfyUI the device is CUDA when available, else the CPU; free
memory is the CUDA driver's figure (:func:`~stepvideo_core.memory.cuda_free_vram`); freeing
memory collects garbage and empties the CUDA cache; pinning is torch's own.
"""

from __future__ import annotations

import gc
import logging
from typing import Optional

import torch

from ...stepvideo_core.offload.streamer import TorchCuda
from ...stepvideo_core.memory import cuda_free_vram
from .modules import _comfy

log = logging.getLogger("StepVideo")


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


# --------------------------------------------------------------------------- memory


def _release_torch_cache() -> None:
    """Collect garbage and hand PyTorch's cached CUDA memory back: what freeing memory means outside ComfyUI."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    _release_torch_cache()


def free_vram(device: torch.device | None = None) -> int | None:
    """Return the free memory of `device` in bytes, or None when it is not an accelerator.

    Inside ComfyUI this is ``comfy.model_management.get_free_memory`` (which counts memory
    PyTorch has cached but not used as free); elsewhere the CUDA driver's figure plus that
    cached-but-unused memory (the core's :func:`~stepvideo_core.memory.cuda_free_vram`, which
    the core's own plans use too). Used by memory plans such as the text encoder's.
    """
    device = torch.device(device) if device is not None else torch_device()
    if device.type == "cpu":
        return None
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return int(mm.get_free_memory(device))
    return cuda_free_vram(device)


def empty_cache() -> None:
    """Hand cached-but-unused accelerator memory back (after a run), without unloading any model.

    Inside ComfyUI: ``comfy.model_management.soft_empty_cache()``; elsewhere the CUDA cache.
    """
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
        return
    _release_torch_cache()


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
