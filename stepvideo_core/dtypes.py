"""The floating-point dtype names the pack accepts, and its one default-dtype rule.

Command lines (``--dtype``), the converters and the ComfyUI combos all spell dtypes as
``bf16`` / ``fp16`` / ``fp32``; :data:`DTYPES` maps those names to torch dtypes and
:data:`DTYPE_NAMES` back (for plans, reports and logs).  A combo may also offer
``"default"``, which :func:`default_dtype` resolves for the compute device.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEFAULT = "default"  # the choice resolved by default_dtype(device)


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """The dtype a model computes in when none is asked for: bf16 on CUDA, fp32 elsewhere.

    bf16 is what the official pipeline runs on its GPUs; on the CPU bf16 matmuls are slow
    and less exact, so fp32 is used there.  The DiT, the VAE and the pipeline all follow it.
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str, device: Optional[Union[str, torch.device]] = None, *,
                choices: Optional[Iterable[str]] = None, what: str = "dtype") -> torch.dtype:
    """Return the torch dtype that ``name`` (one of ``choices``) stands for.

    ``choices`` defaults to every name in :data:`DTYPES`; it may include ``"default"``,
    which resolves to :func:`default_dtype` of ``device``.  Any other name raises a
    ValueError naming ``what`` was asked for and the allowed names, so every caller
    reports an unknown choice the same way.
    """
    allowed = list(DTYPES if choices is None else choices)
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; expected one of {allowed}")
    if name == DEFAULT:
        if device is None:
            raise ValueError(f'{what} "default" needs the compute device to resolve it')
        return default_dtype(device)
    return DTYPES[name]
