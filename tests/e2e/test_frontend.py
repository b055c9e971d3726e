"""The web extension in the real ComfyUI frontend, driven by headless Chromium (playwright-core):
it loads without errors from our files, the shipped UI workflows load with no missing
nodes, the memory plan appears on the sampler (and turns red when a run will not fit),
sizes snap, and queueing such a run warns. Screenshots go to the test's tmp folder and
to tests/e2e/artifacts/ (git-ignored).

Needs COMFYUI_DIR (see conftest.py), Node.js, Chromium (CHROMIUM, default /usr/bin/chromium)
and playwright-core (PLAYWRIGHT_CORE_DIR, default .ci/node of this checkout, where .ci/run runs
``npm ci``); skipped otherwise, failed instead under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.e2e.comfy_server import REPO_ROOT

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"
UI_WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
MAIN_WORKFLOW = REPO_ROOT / "workflows" / "stepvideo_t2v.json"
# Where .ci/run installs playwright-core (`npm ci` of .ci/node/package-lock.json); ui_check.cjs has the same default.
DEFAULT_PLAYWRIGHT_DIR = REPO_ROOT / ".ci" / "node"


def has_playwright_core(folder: Path) -> bool:
    """``folder`` holds node_modules/playwright-core, or is that package itself (what ui_check.cjs loads)."""
    if (folder / "node_modules" / "playwright-core" / "package.json").is_file():
        return True
    try:
        return json.loads((folder / "package.json").read_text(encoding="utf-8")).get("name") == "playwright-core"
    except (OSError, ValueError, AttributeError):
        return False


def browser_tools() -> dict:
    """node, Chromium and playwright-core, or a skip (a failure under CI) naming the missing one."""
    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    playwright = Path(os.environ.get("PLAYWRIGHT_CORE_DIR") or DEFAULT_PLAYWRIGHT_DIR).expanduser()
    if node is None:
        skip_or_fail("node (Node.js) not found on PATH")
    if not Path(chromium).is_file():
        skip_or_fail(f"Chromium not found at {chromium} (apt-get install chromium, or set CHROMIUM)")
    if not has_playwright_core(playwright):
        skip_or_fail(f"playwright-core not found in {playwright} (npm ci --prefix .ci/node, or npm install "
                     f"playwright-core in a folder named by PLAYWRIGHT_CORE_DIR)")
    return {"node": node, "env": dict(os.environ, CHROMIUM=chromium, PLAYWRIGHT_CORE_DIR=str(playwright))}


def ours(entry: dict) -> bool:
    """A console error caused by this pack's files (offline 404s of external resources are not)."""
    return "stepvideo" in (entry["text"] + " " + entry["url"]).lower()


@pytest.fixture(scope="module")
def ui(comfy_server, tmp_path_factory):
    tools = browser_tools()
    out = tmp_path_factory.mktemp("ui")
    workflows = [MAIN_WORKFLOW] + [p for p in UI_WORKFLOWS if p != MAIN_WORKFLOW]
    cmd = [tools["node"], str(HERE / "ui_check.cjs"), "--url", comfy_server.url, "--out", str(out),
           *map(str, workflows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=tools["env"], cwd=REPO_ROOT)
    assert proc.returncode == 0, f"ui_check.cjs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ARTIFACTS.mkdir(exist_ok=True)
    for shot in result["screenshots"]:
        shutil.copy(shot, ARTIFACTS / Path(shot).name)
    (ARTIFACTS / "ui_check.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def test_extension_loads_without_errors_from_our_files(ui):
    assert {"StepVideo.ModelLoaderSummary", "StepVideo.MemoryPlan"} <= set(ui["extensions"])
    assert [e for e in ui["console"] if ours(e)] == []
    assert ui["pageErrors"] == []


def test_shipped_ui_workflows_load_with_no_missing_nodes(ui):
    assert set(ui["workflows"]) == {p.name for p in UI_WORKFLOWS}
    for name, facts in ui["workflows"].items():
        assert facts["missing"] == [], f"{name}: missing node types {facts['missing']}"
        assert facts["loaded"] == facts["nodes"], name


def test_plan_text_appears_on_the_sampler_and_the_loader(ui):
    assert ui["samplerPlan"].startswith("CPU server: no VRAM to plan"), ui["samplerPlan"]
    assert "TFLOP/step × 50 steps" in ui["samplerPlan"]
    assert ui["loaderPlan"] == "992x544x204: no VRAM to plan (CPU server)"


def test_sizes_snap_with_a_hint(ui):
    assert ui["snap"]["width"] == 1008 and ui["snap"]["frames"] == 102
    assert "width 1000 → 1008 (multiple of 16)" in ui["snap"]["plan"]
    assert "frames 100 → 102 (multiple of 17, 4.1 s)" in ui["snap"]["plan"]


def test_assumed_vram_plans_and_a_run_that_cannot_fit_is_red(ui):
    assert "blocks on GPU" in ui["assumed24"] and "24.0 GiB assumed" in ui["assumed24"]
    assert any(line.startswith("✗ WILL NOT FIT: needs") for line in ui["noFit"].splitlines()), ui["noFit"]
    assert "try fp8_scaled, blocks auto, smaller video" in ui["noFit"]
    assert ui["noFitColor"] == "rgb(255, 82, 82)"


def test_queueing_a_run_that_cannot_fit_warns_but_still_queues(ui):
    assert ui["queueWrapped"] is True
    assert ui["queued"] == 1 and ui["queuedSampler"]["width"] == 4096
    assert "stepvideo_plan" not in ui["queuedSampler"]  # display widgets are not sent
    assert any("will likely fail with out of memory" in w for w in ui["warnings"]), ui["warnings"]
    assert any("may not fit in VRAM" in t for t in ui["toasts"]), ui["toasts"]
