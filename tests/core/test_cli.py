"""The command line's smoke check (what the README's first set-up command runs)."""

import subprocess
import sys

from stepvideo_core.cli import main
from tests.factory import write_tiny_dit


def test_check_with_the_embedded_tiny_model(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "not real weights" in out and "velocity [2, 3, 64, 4, 6] (finite)" in out and out.endswith("OK\n")


def test_check_an_existing_checkpoint_in_bf16(tmp_path, capsys):
    path = write_tiny_dit(tmp_path, layout="single", prefix="model.diffusion_model.")
    assert main(["check", "--transformer", str(path), "--dtype", "bf16"]) == 0
    assert "torch.bfloat16" in capsys.readouterr().out


def test_bad_path_is_a_clear_error_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stepvideo_core", "check", "--transformer", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no such file or folder") and "Traceback" not in result.stderr
