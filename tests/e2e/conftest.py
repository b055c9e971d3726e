"""Fixtures of the end-to-end tests: one real ComfyUI server per test session (started on first use).

Needs ``COMFYUI_DIR`` (a ComfyUI source tree, v0.33+) and an interpreter with ComfyUI's
requirements plus this pack's (``COMFYUI_PYTHON``, default: the one running pytest), e.g.
``COMFYUI_DIR=~/comfy/ComfyUI ~/comfy/venv/bin/python -m pytest -q tests/e2e``.  What is missing
skips the tests with its reason, or fails them under ``CI=true`` (:func:`tests.conftest.skip_or_fail`).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.e2e.comfy_server import COMFYUI_DIR, NO_COMFYUI, ComfyServer, make_base_dir

# What main.py and the pack import at start (a venv without them cannot run the server).
SERVER_IMPORTS = ("aiohttp", "torch", "torchaudio", "safetensors", "sentencepiece", "transformers", "av")


def comfy_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


def missing_imports(python: str) -> list[str]:
    """The modules of :data:`SERVER_IMPORTS` that ``python`` cannot import."""
    code = ("import importlib.util, sys\n"
            f"print(' '.join(m for m in {SERVER_IMPORTS!r} if importlib.util.find_spec(m) is None))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return [f"(cannot run {python}: {out.stderr.strip()[-200:]})"]
    return out.stdout.split()


def require_imports(python: str) -> None:
    """Skip (fail under CI) unless ``python`` can import what ComfyUI's server and the pack need."""
    missing = missing_imports(python)
    if missing:
        skip_or_fail(f"{python} cannot import {missing}: run with ComfyUI's venv or set COMFYUI_PYTHON "
                     f"(and pip install -r requirements.txt into it)")


@pytest.fixture(scope="session", autouse=True)
def comfyui_dir() -> Path:
    """The ComfyUI tree of ``COMFYUI_DIR``; every e2e test needs it (skip, or fail under CI, without it)."""
    if not COMFYUI_DIR:
        skip_or_fail(NO_COMFYUI)
    path = Path(COMFYUI_DIR).expanduser()
    if not (path / "main.py").is_file():
        skip_or_fail(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py: not a ComfyUI tree")
    return path


@pytest.fixture(scope="session")
def comfyui_importable(comfyui_dir) -> Path:
    """The ComfyUI tree, once this interpreter is known to have ComfyUI's requirements (for in-process tests)."""
    require_imports(sys.executable)
    return comfyui_dir


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, tmp_path_factory):
    """A started :class:`ComfyServer` (``--cpu``, loopback, free port) with this pack and tiny models."""
    python = comfy_python()
    require_imports(python)
    if importlib.util.find_spec("websocket") is None:
        skip_or_fail("websocket-client is needed to follow runs on /ws: pip install websocket-client")

    from stepvideo_core.tiny import cached_tiny_release

    release, _ = cached_tiny_release()
    base = make_base_dir(tmp_path_factory.mktemp("comfy-base"), release)
    extra = shlex.split(os.environ.get("STEPVIDEO_E2E_COMFY_ARGS", ""))
    # GPU workers (the sampler's gpus > 1, CPU worker processes here): a hung collective fails in 2 minutes
    env = {"STEPVIDEO_PARALLEL_TIMEOUT": os.environ.get("STEPVIDEO_PARALLEL_TIMEOUT", "120")}
    server = ComfyServer(comfyui_dir, base, python=python, extra_args=extra, env=env).start()
    try:
        yield server
    finally:
        server.stop()
