"""What the installed torch can do, as skip marks for the tests of a capability it may lack.

``needs_cpu_fp8_matmul`` (also in ``pytest.param(..., marks=...)``) skips a test of the fp8 matmul
path itself where this torch has no CPU fp8 ``torch._scaled_mm`` with row-wise scales (torch 2.9.1,
what ComfyUI users run, has none; 2.13 has).  Users of such a torch get the dequantise path, which
tests/core/test_fp8_fallback.py checks under every torch.  Decided once, at collection, by the
pack's own probe (:func:`stepvideo_core.fp8.fp8_matmul_supported`) asked with an empty probe cache.

:func:`require_inductor` skips (under ``CI=true``: fails) a test that needs ``torch.compile``'s inductor
on the CPU where it cannot compile (no C++ compiler), saying why.
"""

from __future__ import annotations

import functools
from typing import Optional
from unittest import mock

import pytest
import torch

from stepvideo_core import fp8


def _cpu_fp8_matmul() -> bool:
    with mock.patch.dict(fp8._FP8_MATMUL_PROBED, clear=True):
        return fp8.fp8_matmul_supported(torch.device("cpu"))


CPU_FP8_MATMUL = _cpu_fp8_matmul()
needs_cpu_fp8_matmul = pytest.mark.skipif(
    not CPU_FP8_MATMUL,
    reason=f"torch {torch.__version__} has no CPU fp8 torch._scaled_mm with row-wise scales "
           f"(stepvideo_core.fp8.fp8_matmul_supported(cpu) is False); its users get the dequantise path")


@functools.lru_cache(maxsize=None)
def inductor_cpu_problem() -> Optional[str]:
    """Why torch.compile's inductor cannot compile on this CPU (no C++ compiler, a torch without it), or None.

    Asked once per session, lazily (compiling even a one-line function takes seconds): by the tests
    of the compiled transformer blocks (stepvideo_core.compile), through :func:`require_inductor`.
    """
    try:
        x = torch.arange(4.0)
        if not torch.equal(torch.compile(lambda t: t * 2 + 1, backend="inductor", dynamic=False)(x), x * 2 + 1):
            return "inductor compiled a wrong result"
    except Exception as exc:  # noqa: BLE001 - any failure means: no inductor here
        return f"torch {torch.__version__} cannot compile with inductor on the CPU: {type(exc).__name__}: " \
               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} (it needs a C++ compiler: gcc/g++)"
    return None


def require_inductor() -> None:
    """Skip the calling test (fail it under CI=true) when inductor cannot compile here, with the reason."""
    from tests.conftest import skip_or_fail

    problem = inductor_cpu_problem()
    if problem is not None:
        skip_or_fail(problem)
