"""stepvideo_core stays pure PyTorch: no ComfyUI imports, and only relative imports of itself.

Relative self-imports let the same folder work as the top-level package ``stepvideo_core``
(pip install, CLI, tests) and as ``<pack>.stepvideo_core`` inside ComfyUI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "stepvideo_core"
BANNED = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server",
          "nodes", "node_helpers", "execution", "latent_preview"}
CORE_FILES = sorted(CORE.rglob("*.py"))


def imported_modules(tree: ast.AST):
    """Yield (line, absolute module name or None, relative level) for every import in `tree`,
    including ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.module, node.level
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value, 0


def test_core_folder_has_python_files():
    assert (CORE / "__init__.py").is_file()
    assert len(CORE_FILES) >= 2


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.relative_to(CORE).as_posix())
def test_core_module_imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    depth = len(path.relative_to(CORE).parts) - 1  # packages between this file and the core root
    problems = []
    for line, module, level in imported_modules(tree):
        where = f"{path.relative_to(CORE.parent)}:{line}"
        if level == 0:
            top = (module or "").split(".")[0]
            if top in BANNED:
                problems.append(f"{where} imports ComfyUI module {module!r}")
            if top == "stepvideo_core":
                problems.append(f"{where} imports {module!r} absolutely; use a relative import")
        elif level - 1 > depth:
            problems.append(f"{where} relative import climbs out of stepvideo_core")
    assert not problems, "\n".join(problems)


def test_scanner_catches_the_forbidden_forms():
    """Guard the guard: every forbidden form is detected by imported_modules."""
    src = "import folder_paths\nfrom comfy.utils import ProgressBar\nimport importlib\nimportlib.import_module('comfy_api.latest')\n"
    found = [m for _, m, _ in imported_modules(ast.parse(src))]
    assert {"folder_paths", "comfy.utils", "comfy_api.latest"} <= set(found)
