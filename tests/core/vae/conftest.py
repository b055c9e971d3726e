"""Shared access to the official VAE parity fixture and to small random VAEs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stepvideo_core import load_vae
from tests.factory import write_tiny_vae

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "stepvideo_vae_tiny.safetensors"


class VAEFixture:
    """The fixture's groups: config (oracle metadata), state_dict (on-disk names), inputs, outputs."""

    def __init__(self, path: Path):
        with safe_open(str(path), framework="pt") as f:
            self.meta = json.loads(f.metadata()["oracle"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.config = self.meta["config"]
        self.state_dict = self.group(tensors, "state_dict.")
        self.inputs = self.group(tensors, "inputs.")
        self.outputs = self.group(tensors, "outputs.")

    @staticmethod
    def group(tensors, prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def vae_fixture() -> VAEFixture:
    return VAEFixture(FIXTURE)


@pytest.fixture(scope="session")
def fixture_vae(vae_fixture, tmp_path_factory):
    """The fixture's weights written as one file in the release's naming and loaded by load_vae (fp32)."""
    path = write_tiny_vae(tmp_path_factory.mktemp("vae_fx"), layout="single", state_dict=vae_fixture.state_dict)
    return load_vae(path, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A random tiny VAE (the fixture's architecture) loaded from the official layout."""
    return load_vae(write_tiny_vae(tmp_path_factory.mktemp("vae_tiny"), seed=3))
