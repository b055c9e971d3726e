"""Shared access to the official DiT parity fixture (see tests/fixtures/README.md)."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "stepvideo_dit_tiny.safetensors"


class DiTFixture:
    """The fixture's groups: config, state_dict (checkpoint names), inputs, outputs, activations."""

    def __init__(self, path: Path):
        with safe_open(str(path), framework="pt") as f:
            self.meta = json.loads(f.metadata()["oracle"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.config = self.meta["config"]
        self.state_dict = self.group(tensors, "state_dict.")
        self.inputs = self.group(tensors, "inputs.")
        self.outputs = self.group(tensors, "outputs.")
        self.activations = self.group(tensors, "activations.fp32.")

    @staticmethod
    def group(tensors, prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="session")
def dit_fixture() -> DiTFixture:
    return DiTFixture(FIXTURE)
