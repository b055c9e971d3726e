"""The web extension's copy of the VAE's size rules matches the Python constants.

JavaScript cannot import :mod:`stepvideo_core.vae.config`, so ``web/lib/snap.js`` spells the
16 (pixels per latent cell) and 17 (frames per VAE chunk) out itself; this test reads the
source and fails when the two drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

from stepvideo_core.vae.config import FRAME_CHUNK, SPATIAL_FACTOR

SNAP_JS = Path(__file__).resolve().parents[1] / "web" / "lib" / "snap.js"
RULE = re.compile(r"(\w+):\s*Object\.freeze\(\{\s*step:\s*(\d+),\s*min:\s*(\d+),\s*max:\s*(\d+)\s*\}\)")


def snap_rules(source: str) -> dict:
    """``{widget name: (step, min, max)}`` as the ``SNAP_RULES`` table of snap.js writes them."""
    return {name: tuple(int(v) for v in values) for name, *values in RULE.findall(source)}


def test_snap_rules_step_by_the_vae_factors():
    rules = snap_rules(SNAP_JS.read_text(encoding="utf-8"))
    assert set(rules) == {"width", "height", "frames"}, rules
    expected = {"width": SPATIAL_FACTOR, "height": SPATIAL_FACTOR, "frames": FRAME_CHUNK}
    for name, (step, minimum, maximum) in rules.items():
        assert step == expected[name] and minimum == expected[name], (name, step, minimum, expected[name])
        assert maximum % step == 0, (name, maximum, step)


def test_hint_literals_name_the_vae_factors():
    """The hint texts that spell a step out (instead of reading it from the table) say the right number."""
    source = SNAP_JS.read_text(encoding="utf-8")
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("//", "/*", "*")))
    literals = [int(n) for n in re.findall(r"multiple of (\d+)", code)]
    assert literals, "snap.js no longer names a step in its hints: drop this test"
    assert set(literals) <= {SPATIAL_FACTOR, FRAME_CHUNK}, literals
    assert FRAME_CHUNK in literals
