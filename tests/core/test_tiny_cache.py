"""The tiny release cache: written once, whole, and shared by concurrent first runs (two torchrun ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stepvideo_core import tiny
from stepvideo_core.tiny import cached_tiny_release, tiny_release_key

ROOT = Path(__file__).resolve().parents[2]


def _marker(cache: Path) -> Path:
    return cache / f"tiny-{tiny_release_key()}" / tiny._COMPLETE


def test_a_waiting_writer_uses_the_release_written_meanwhile(tmp_path, monkeypatch):
    """A process that saw no release, then waited for the lock, must not remove the one another wrote."""
    release, created = cached_tiny_release(tmp_path)
    assert created
    before = os.stat(_marker(tmp_path))
    checks = []
    real = tiny._complete

    def not_yet_on_the_first_look(root):  # as if another process finished between the look and the lock
        checks.append(root)
        return len(checks) > 1 and real(root)

    monkeypatch.setattr(tiny, "_complete", not_yet_on_the_first_look)
    again, created = cached_tiny_release(tmp_path)
    after = os.stat(_marker(tmp_path))
    assert again == release and not created and len(checks) == 2
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_leftover_without_its_marker_is_replaced(tmp_path):
    stale = tmp_path / f"tiny-{tiny_release_key()}"
    (stale / "stepvideo-t2v").mkdir(parents=True)
    (stale / "stepvideo-t2v" / "half-written").write_text("x")
    release, created = cached_tiny_release(tmp_path)
    assert created and not (release / "half-written").exists()
    assert json.loads(_marker(tmp_path).read_text())["key"] == tiny_release_key()


def test_concurrent_first_runs_share_one_release(tmp_path):
    """Two processes starting on an empty cache at once: one writes, both get the same whole release."""
    code = ("import json, sys; from stepvideo_core.tiny import cached_tiny_release; "
            "path, created = cached_tiny_release(sys.argv[1]); print(json.dumps([str(path), created]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0][0] == results[1][0]
    assert sorted(created for _, created in results) == [False, True]
    release = Path(results[0][0])
    assert {p.name for p in release.iterdir()} >= {"transformer", "vae", "step_llm", "hunyuan_clip"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-") and p.is_dir()]  # no temp left
