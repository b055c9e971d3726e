"""Running ``python -m stepvideo_core`` in-process for the CLI tests (no test here)."""

from __future__ import annotations

import io

import pytest

from stepvideo_core.cli import main


def run_cli(argv):
    """(exit code, stdout, stderr) of one ``python -m stepvideo_core`` call."""
    with pytest.MonkeyPatch.context() as mp:
        stdout, stderr = io.StringIO(), io.StringIO()
        mp.setattr("sys.stdout", stdout)
        mp.setattr("sys.stderr", stderr)
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()
