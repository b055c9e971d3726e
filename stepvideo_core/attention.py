"""The one attention dispatch of the package.

All models call :func:`attention` with ``[B, H, S, D]`` tensors.  It runs
PyTorch's ``scaled_dot_product_attention`` by default and, when asked (or when
``"auto"`` finds them), SageAttention or flash-attn on CUDA.

Backends
--------
``"sdpa"``           PyTorch SDPA; runs everywhere.  The default, and the reference.
``"sageattention"``  ``sageattention.sageattn`` (INT8 QK / FP8 PV kernels), CUDA, fp16/bf16.
``"flash_attn"``     ``flash_attn.flash_attn_func``, CUDA, fp16/bf16.
``"auto"``           the first of sageattention, flash_attn, sdpa that can run the call.

Masked calls (the DiT's cross-attention over at most 397 text tokens) always
run through SDPA: the GPU kernels above take no arbitrary boolean mask, and the
call is tiny next to the 3D self-attention.  Asking explicitly for a backend
that cannot run here raises :class:`AttentionBackendError` saying how to fix it.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "sageattention", "flash_attn")

_INSTALL_HINTS = {
    "sageattention": "pip install sageattention  (or: pip install comfyui-stepvideo[sageattention]); "
                     "it needs an NVIDIA GPU with CUDA",
    "flash_attn": "pip install flash-attn --no-build-isolation; it needs an NVIDIA GPU with CUDA",
}
_MODULES = {"sageattention": "sageattention", "flash_attn": "flash_attn"}


class AttentionBackendError(RuntimeError):
    """An attention backend was requested that cannot run in this environment."""


def _module_available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def backend_unavailable_reason(name: str, device: Optional[torch.device] = None,
                               dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why backend ``name`` cannot run on (device, dtype), or None when it can.

    ``device``/``dtype`` None means "not known yet": only the install is checked.
    """
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}"
    if name in ("sdpa", "auto"):
        return None
    if not _module_available(_MODULES[name]):
        return f"the package {_MODULES[name]!r} is not installed ({_INSTALL_HINTS[name]})"
    if device is not None and torch.device(device).type != "cuda":
        return f"{name} runs only on CUDA tensors, this call is on {torch.device(device).type}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"{name} needs float16 or bfloat16 inputs, got {dtype}"
    return None


def available_backends(device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> list[str]:
    """Backends that can run on (device, dtype) here; always contains "auto" and "sdpa"."""
    return [b for b in BACKENDS if backend_unavailable_reason(b, device, dtype) is None]


def check_backend(name: str, device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None) -> str:
    """Return ``name`` if it can run, else raise :class:`AttentionBackendError` with a fix."""
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise AttentionBackendError(
            f"attention backend {name!r} is not usable: {reason}. "
            f"Use 'sdpa' (always available) or 'auto' (best available).")
    return name


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, masked: bool) -> str:
    """The concrete backend that runs one call: "sdpa", "sageattention" or "flash_attn".

    "auto" picks the fastest usable one.  Masked calls always resolve to "sdpa"
    (see module docstring); an explicit, unusable request raises.
    """
    if requested == "auto":
        if masked:
            return "sdpa"
        for name in ("sageattention", "flash_attn"):
            if backend_unavailable_reason(name, device, dtype) is None:
                return name
        return "sdpa"
    check_backend(requested, device, dtype)
    return "sdpa" if masked else requested


class Resolved(str):
    """A backend request already resolved for one device and dtype: equal to the requested name
    ("auto", "sdpa", ...), with the ``kernel`` its unmasked calls run ("sdpa", "sageattention", "flash_attn").

    Exists so that a model resolves (and checks) its backend once per device and dtype, not in each
    of its attention calls (:meth:`~stepvideo_core.dit.model.StepVideoTransformer.resolved_attention`):
    :func:`attention` given one skips :func:`resolve_backend`.  Masked calls still take SDPA.
    """

    __slots__ = ("kernel",)

    def __new__(cls, requested: str, kernel: str):
        if kernel not in ("sdpa", "sageattention", "flash_attn"):
            raise ValueError(f"not a concrete attention kernel: {kernel!r}")
        obj = super().__new__(cls, requested)
        obj.kernel = kernel
        return obj

    def __reduce__(self):
        return (Resolved, (str(self), self.kernel))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              mask: Optional[torch.Tensor] = None, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D).

    q: [B, H, Sq, D]; k, v: [B, H, Sk, D]; mask: bool, broadcastable to
    [B, H, Sq, Sk], True = attend.  Returns [B, H, Sq, D] in q's dtype.
    ``backend``: a name of :data:`BACKENDS` (resolved for this call) or a :class:`Resolved` one.
    """
    if isinstance(backend, Resolved):  # resolved and checked by the caller for this device and dtype
        name = "sdpa" if mask is not None else backend.kernel
    else:
        name = resolve_backend(backend, q.device, q.dtype, mask is not None)
    if name in ("sageattention", "flash_attn"):
        return _gpu_kernel(name, q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.compiler.disable
def _gpu_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention or flash-attn on [B, H, S, D] tensors.

    Never traced by ``torch.compile`` (compiled transformer blocks, :mod:`stepvideo_core.compile`): the
    kernels are called eagerly from the graph (a graph break), as their own packages expect.
    """
    if name == "sageattention":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
    return out.transpose(1, 2)
