"""Reading the official-code parity fixtures in tests/fixtures/ (see their README)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

FIXTURES = Path(__file__).resolve().parent / "fixtures"


class OracleFixture:
    """One fixture file: ``meta`` (the ``oracle`` metadata), ``config``, and its tensor groups
    ``state_dict``, ``inputs``, ``outputs`` and ``activations`` (fp32), keyed without their prefix."""

    def __init__(self, name: str):
        with safe_open(str(FIXTURES / name), framework="pt") as f:
            self.meta = json.loads(f.metadata()["oracle"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.config = self.meta.get("config")
        self.state_dict = self.group(tensors, "state_dict.")
        self.inputs = self.group(tensors, "inputs.")
        self.outputs = self.group(tensors, "outputs.")
        self.activations = self.group(tensors, "activations.fp32.")

    @staticmethod
    def group(tensors: dict, prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|: the relative error every parity test bounds."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
