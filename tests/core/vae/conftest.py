"""Shared access to the official VAE parity fixture and to small random VAEs."""

import pytest
import torch

from stepvideo_core import load_vae
from tests.factory import write_tiny_vae
from tests.oracle import OracleFixture


@pytest.fixture(scope="session")
def vae_fixture() -> OracleFixture:
    return OracleFixture("stepvideo_vae_tiny.safetensors")


@pytest.fixture(scope="session")
def fixture_vae(vae_fixture, tmp_path_factory):
    """The fixture's weights written as one file in the release's naming and loaded by load_vae (fp32)."""
    path = write_tiny_vae(tmp_path_factory.mktemp("vae_fx"), layout="single", state_dict=vae_fixture.state_dict)
    return load_vae(path, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A random tiny VAE (the fixture's architecture) loaded from the official layout."""
    return load_vae(write_tiny_vae(tmp_path_factory.mktemp("vae_tiny"), seed=3))
