"""Shared access to the official DiT parity fixture (see tests/fixtures/README.md)."""

import pytest

from tests.oracle import OracleFixture


@pytest.fixture(scope="session")
def dit_fixture() -> OracleFixture:
    return OracleFixture("stepvideo_dit_tiny.safetensors")
