"""What the installed torch can do, as skip marks for the tests of a capability it may lack.

``needs_cpu_fp8_matmul`` (also in ``pytest.param(..., marks=...)``) skips a test of the fp8 matmul
path itself where this torch has no CPU fp8 ``torch._scaled_mm`` with row-wise scales (torch 2.9.1,
what ComfyUI users run, has none; 2.13 has).  Users of such a torch get the dequantise path, which
tests/core/test_fp8_fallback.py checks under every torch.  Decided once, at collection, by the
pack's own probe (:func:`stepvideo_core.fp8.fp8_matmul_supported`) asked with an empty probe cache.
"""

from __future__ import annotations

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
