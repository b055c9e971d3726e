"""Memory figures and housekeeping: how much RAM and CUDA memory is free, and heap trimming between chunks.

glibc's allocator raises its mmap threshold after large frees, so the big
activation buffers of one VAE chunk end up in the heap, and fragments of it
stay mapped: resident memory then creeps up chunk after chunk although nothing
is held.  ``malloc_trim(0)`` hands the free heap pages back to the system.
There is no library for this one call, hence ctypes; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Optional, Union

import torch


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` function, or None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def trim_host_heap() -> bool:
    """Return freed heap memory to the OS (glibc); True when something was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def available_host_bytes() -> Optional[int]:
    """RAM a new allocation can take now, in bytes (None when unknown).

    psutil's ``available`` (what the kernel can hand out without swapping), lowered to the
    room left under a cgroup v2 memory limit when the process runs in a container that
    has one (a container's own limit is what the out-of-memory killer enforces).
    """
    try:
        import psutil
    except ImportError:  # psutil is a requirement of the pack and of ComfyUI; be lenient anyway
        return None
    available = int(psutil.virtual_memory().available)
    limit = _cgroup_room()
    return available if limit is None else min(available, limit)


def _cgroup_room(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes left under this cgroup's ``memory.max`` (cgroup v2), or None without a limit."""
    try:
        with open(f"{root}/memory.max") as f:
            limit = f.read().strip()
        with open(f"{root}/memory.current") as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(0, int(limit) - current)


def cuda_free_vram(device: Union[str, torch.device]) -> Optional[int]:
    """Return the free memory (bytes) of a CUDA ``device`` for memory plans, or None for other devices.

    The driver's free figure plus what PyTorch's allocator holds cached but unused (it can hand that
    out again without asking the driver). The one definition of this figure: the core's plans use it,
    and the nodes' bridge uses it outside ComfyUI (inside, ComfyUI's own figure counts the same way).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
