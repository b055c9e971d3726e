"""The README and docs/ pages: every relative link reaches its file and every ``#anchor`` a heading there
(GitHub's slugs), so moving a section cannot silently break the links to it."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def slug(title: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", re.sub(r"`|\*\*|\*", "", title)).strip().lower()
    kept = "".join(c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("L"))
    return kept.replace(" ", "-")


def anchors(page: Path) -> set:
    """Every heading anchor of ``page`` (repeated headings get -1, -2, ... as on GitHub)."""
    seen, found = {}, set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^(#{1,6})\s+(.*)", line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t) and not t.startswith("mailto:")]


def test_slugs_are_githubs():
    assert slug("Two paths: the one-node sampler or a native ComfyUI MODEL") == \
        "two-paths-the-one-node-sampler-or-a-native-comfyui-model"
    assert slug("`StepVideoSampler`") == "stepvideosampler"
    assert slug("Command line: a video without ComfyUI") == "command-line-a-video-without-comfyui"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_starts_with_the_two_commands():
    """The two set-up commands (the main job, the tests) are on the README's first screen."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    first_screen = "\n".join(lines[:60])
    assert "python -m stepvideo_core generate" in first_screen and "bash .ci/run" in first_screen
    assert len(lines) <= 260
