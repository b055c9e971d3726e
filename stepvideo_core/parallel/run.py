"""``torchrun --nproc_per_node N -m stepvideo_core generate ... --parallel auto|ulysses|cfg``: joining the run.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; this module turns
them into a process group (NCCL when the ranks compute on CUDA, gloo on CPUs) and a
:class:`~.context.ParallelContext`.  Without torchrun (``WORLD_SIZE`` unset or 1) nothing happens.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from .context import ParallelContext
from .jobs import DEFAULT_TIMEOUT_S, ENV_TIMEOUT  # seconds a collective may wait for a lost rank
from .layout import ParallelLayout


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: Optional[str]) -> torch.device:
    """This rank's compute device: ``cuda:LOCAL_RANK`` on a CUDA machine (unless ``device`` says cpu), else cpu."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and torch.device(device).type == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {local} has no GPU: {torch.cuda.device_count()} visible, "
                               f"--nproc_per_node must be at most that")
        return torch.device("cuda", local)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """The process-group backend for ranks computing on ``device``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def join(mode: str, heads: int, guided: bool, device: Optional[str] = None) -> Optional[ParallelContext]:
    """The :class:`ParallelContext` of this torchrun rank (process group started), or None without torchrun.

    Raises :class:`~.layout.ParallelConfigError` for a layout that cannot run (checked before any
    weight is read: the heads and the guidance are known from the file headers and the settings).
    """
    world = world_size()
    if world <= 1:
        return None
    layout = ParallelLayout.choose(mode, world, heads, guided)
    compute = rank_device(device)
    if compute.type == "cuda":
        torch.cuda.set_device(compute)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend_for(compute), timeout=timeout)
    return ParallelContext.create(layout, compute)


def leave() -> None:
    """End this rank's part (destroys the process group if one was started)."""
    if dist.is_initialized():
        dist.destroy_process_group()
