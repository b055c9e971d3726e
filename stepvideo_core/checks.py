"""Finiteness rules shared by every boundary: settings, adapter files, checkpoint scales, the sampler.

A NaN passes every range check (each comparison with NaN is false), so a NaN
``cfg`` or LoRA strength would otherwise run to the end and produce a black
video that looks like a success.  The rules live here once:

* :func:`finite_float` -- a user setting (cfg, shift, LoRA strength...) as a
  float, or ValueError ``"cfg must be a finite number, got nan"``;
* :func:`count_non_finite` -- how many NaN/Inf values a tensor holds (one reduction);
* :class:`NonFiniteError` -- raised when a computation produced NaN/Inf.
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """A tensor the run depends on holds NaN or Inf; the message says which one and the likely causes."""


def finite_float(value, name: str = "") -> float:
    """``value`` as a float; raises ValueError unless it is a finite number.

    Exists so that a NaN/Inf setting is refused where it enters (node, CLI, pipeline),
    with a message naming the input: ``"cfg must be a finite number, got nan"``.
    ``name`` may be empty when the caller prefixes the message itself (argparse does:
    ``argument --cfg: must be a finite number, got 'nan'``).
    """
    subject = f"{name} must" if name else "must"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{subject} be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{subject} be a finite number, got {value!r}")
    return number


def count_non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf values in ``tensor`` (0 for integer and boolean tensors, which cannot hold them)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    if tensor.element_size() == 1:  # fp8 kernels lack isfinite; their values fit a half exactly
        tensor = tensor.to(torch.float16)
    return int((~torch.isfinite(tensor)).sum())
