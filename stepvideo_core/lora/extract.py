"""A LoRA from the difference of two checkpoints of the same architecture (e.g. Turbo minus base).

Streams tensor by tensor (one layer of each checkpoint in memory at a time):

* Linear / Conv weights: truncated SVD of ``tuned - base`` ->
  ``<module>.lora_down.weight`` [r, in(, kh, kw)], ``<module>.lora_up.weight`` [out, r(, 1, 1)]
  and ``<module>.alpha`` = r (scale 1), the singular values split evenly between the two.
* every other tensor (norm weights, biases, modulation tables): the exact difference
  as ``<module>.diff`` / ``<module>.diff_b`` / ``<parameter>.diff``.
* identical tensors are left out.

Names are our (official) module names, which :func:`~stepvideo_core.lora.load_lora`
reads back.  At full rank the result reproduces the tuned weights up to float rounding.
Pre-quantised fp8 checkpoints are dequantised first.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import fp8
from ..checkpoint import CheckpointError
from ..dit.loader import find_transformer_files

SVD_METHODS = ("auto", "full", "lowrank")


def low_rank(delta: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with ``up @ down`` the best rank-r approximation of 2-D ``delta``.

    "full" runs ``torch.linalg.svd``; "lowrank" the randomised ``torch.linalg``-based
    ``torch.svd_lowrank`` (much faster for r << size, approximate); "auto" uses the
    exact one when r is at least a quarter of the smaller side.
    """
    r = min(rank, *delta.shape)
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; expected one of {SVD_METHODS}")
    if method == "full" or (method == "auto" and 4 * r >= min(delta.shape)):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(delta, q=min(r + 8, *delta.shape), niter=4)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    root = s.sqrt()
    return u * root, root[:, None] * vh


class _Reader:
    """Tensors of one checkpoint by canonical name, full precision (fp8 weights dequantised)."""

    def __init__(self, path, stack: contextlib.ExitStack):
        self.index, _ = find_transformer_files(path)
        self.handles = {f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                        for f in self.index.files}

    def names(self) -> dict:
        """canonical name -> shape, without fp8 bookkeeping tensors (scales, marker)."""
        skip = (fp8.SCALE_SUFFIX,) + fp8.IGNORED_SUFFIXES
        return {k: e.shape for k, e in self.index.items() if k != fp8.MARKER_KEY and not k.endswith(skip)}

    def get(self, name: str) -> torch.Tensor:
        entry = self.index[name]
        tensor = self.handles[entry.file].get_tensor(entry.stored_name)
        if tensor.dtype == fp8.FP8:
            scale_name = name[:-len(".weight")] + fp8.SCALE_SUFFIX
            if scale_name in self.index:
                scale = self.get(scale_name)
                fp8.check_scales(scale, f"{entry.file}: {scale_name}")
                tensor = fp8.dequantize_weight(tensor, fp8.normalize_scale(scale, tensor.shape[0]), torch.float32)
        return tensor.to(torch.float32)


def extract_lora(base, tuned, rank: int, out, dtype: torch.dtype = torch.bfloat16, device="cpu",
                 method: str = "auto", on_tensor: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Write ``out`` (safetensors): a LoRA taking checkpoint ``base`` to ``tuned``; returns a summary dict.

    ``base``/``tuned``: anything :func:`~stepvideo_core.load_transformer` accepts.
    ``rank``: the LoRA rank (capped per layer by its size).  ``dtype``: storage dtype of
    the adapter.  ``device``: where the SVDs run.  ``on_tensor(name, i, n)`` reports progress.
    Raises CheckpointError when the two checkpoints do not have the same tensors and shapes.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    start = time.perf_counter()
    result: dict[str, torch.Tensor] = {}
    counts = {"lowrank": 0, "diff": 0, "identical": 0}
    with contextlib.ExitStack() as stack:
        a, b = _Reader(base, stack), _Reader(tuned, stack)
        shapes_a, shapes_b = a.names(), b.names()
        if shapes_a != shapes_b:
            missing = sorted(set(shapes_a) ^ set(shapes_b))[:5]
            wrong = sorted(k for k in set(shapes_a) & set(shapes_b) if shapes_a[k] != shapes_b[k])[:5]
            raise CheckpointError(f"{a.index.source} and {b.index.source} are not the same architecture: "
                                  f"tensors in only one of them {missing}, different shapes {wrong}")
        names = sorted(shapes_a, key=_natural_key)
        for i, name in enumerate(names):
            if on_tensor is not None:
                on_tensor(name, i, len(names))
            delta = b.get(name).to(device) - a.get(name).to(device)
            if not bool(delta.any()):
                counts["identical"] += 1
                continue
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and delta.ndim in (2, 4):
                up, down = low_rank(delta.flatten(1), rank, method)
                r = down.shape[0]
                result[f"{module}.lora_down.weight"] = down.reshape(r, *delta.shape[1:]).to("cpu", dtype).contiguous()
                result[f"{module}.lora_up.weight"] = up.reshape(delta.shape[0], r, *(1,) * (delta.ndim - 2)).to(
                    "cpu", dtype).contiguous()
                result[f"{module}.alpha"] = torch.tensor(float(r))
                counts["lowrank"] += 1
            else:
                key = f"{module}.diff_b" if leaf == "bias" else (f"{module}.diff" if leaf == "weight" else f"{name}.diff")
                result[key] = delta.to("cpu", dtype).contiguous()
                counts["diff"] += 1
            del delta
    if not result:
        raise CheckpointError(f"{base} and {tuned} hold identical weights: there is nothing to extract")
    info = {"base": str(base), "tuned": str(tuned), "rank": rank, "method": method, **counts}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out), metadata={"format": "pt", "stepvideo_lora": json.dumps(info)})
    return dict(info, out=str(out), tensors=len(result), seconds=time.perf_counter() - start)


def _natural_key(name: str) -> tuple:
    """Sort key putting ``transformer_blocks.10`` after ``transformer_blocks.9`` (block by block)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
