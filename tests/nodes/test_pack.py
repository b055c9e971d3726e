"""The pack as ComfyUI sees it: imports without ComfyUI, registers well-formed V1 nodes."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_pack_imports_in_a_clean_interpreter_without_comfyui():
    """A fresh interpreter, without the repo on sys.path, imports the pack as ComfyUI does."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        root = {str(REPO_ROOT)!r}
        # ComfyUI names a folder pack after its path, dots replaced (nodes.load_custom_node)
        spec = importlib.util.spec_from_file_location(root.replace(".", "_x_"), root + "/__init__.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        banned = [m for m in ("folder_paths", "comfy", "comfy_api", "server") if m in sys.modules]
        assert not banned, banned
        assert "nodes" not in sys.modules, "the pack must not create a top-level `nodes` module"
        print(sorted(mod.NODE_CLASS_MAPPINGS))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "StepVideoModelLoader" in result.stdout


def test_native_family_is_not_offered_without_comfyui():
    """Without ComfyUI the native family (a ComfyUI MODEL) imports but registers nothing, and imports no ComfyUI."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        root = {str(REPO_ROOT)!r}
        spec = importlib.util.spec_from_file_location("pack_without_comfy", root + "/__init__.py",
                                                      submodule_search_locations=[root])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        native = sys.modules["pack_without_comfy.nodes.native"]
        print(json.dumps({{"ids": sorted(mod.NODE_CLASS_MAPPINGS), "native": sorted(native.NODE_CLASS_MAPPINGS),
                          "offered": sorted(native.NATIVE_NODES), "native_model": "pack_without_comfy.nodes.native_model"
                          in sys.modules, "comfy": sorted(m for m in sys.modules if m.split(".")[0] in
                          ("comfy", "comfy_api", "comfy_extras", "folder_paths"))}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import json

    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["native"] == [] and found["native_model"] is False and found["comfy"] == []
    assert "StepVideoNativeModelLoader" in found["offered"] and "StepVideoScheduler" in found["offered"]
    assert not set(found["offered"]) & set(found["ids"])
    assert "StepVideoSampler" in found["ids"]


def test_registration_exports(pack):
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict) and pack.NODE_CLASS_MAPPINGS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) <= set(pack.NODE_CLASS_MAPPINGS)
    assert set(pack.__all__) >= {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"}
    assert not hasattr(pack, "comfy_entrypoint"), "V1 registration only (V1 would win anyway)"


def test_every_node_id_and_category_is_stepvideo(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("StepVideo"), node_id
        assert cls.CATEGORY == "StepVideo" or cls.CATEGORY.startswith("StepVideo/"), (node_id, cls.CATEGORY)
        assert pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, "").startswith("StepVideo"), node_id


def nodes(pack):
    return sorted(pack.NODE_CLASS_MAPPINGS.items())


def check_input(node_id, name, spec):
    """Assert one INPUT_TYPES entry has the V1 shape: (type,) or (type, options)."""
    assert isinstance(name, str) and name.isidentifier(), (node_id, name)
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node_id, name, spec)
    kind = spec[0]
    options = spec[1] if len(spec) == 2 else {}
    assert isinstance(options, dict), (node_id, name)
    if isinstance(kind, list):  # combo
        assert all(isinstance(o, str) for o in kind), (node_id, name)
        assert len(set(kind)) == len(kind), (node_id, name)
        if "default" in options:
            assert options["default"] in kind, (node_id, name, options["default"])
    else:
        assert isinstance(kind, str) and kind, (node_id, name)
        if kind in ("INT", "FLOAT") and "default" in options:
            lo, hi = options.get("min", float("-inf")), options.get("max", float("inf"))
            assert lo <= options["default"] <= hi, (node_id, name)
    if "tooltip" in options:
        assert isinstance(options["tooltip"], str) and options["tooltip"], (node_id, name)


def test_input_types_are_well_formed(pack):
    for node_id, cls in nodes(pack):
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        assert "required" in spec, node_id
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                check_input(node_id, name, entry)


def test_return_types_and_function_are_consistent(pack):
    for node_id, cls in nodes(pack):
        assert isinstance(cls.RETURN_TYPES, tuple), node_id
        assert all(isinstance(t, str) and t.isupper() for t in cls.RETURN_TYPES), node_id
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), (node_id, attr)
        method = getattr(cls, cls.FUNCTION, None)
        assert callable(method), (node_id, cls.FUNCTION)
        # every declared input is a parameter of FUNCTION (V1 passes them as keywords)
        params = inspect.signature(method).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        declared = {n for s in ("required", "optional") for n in cls.INPUT_TYPES().get(s, {})}
        assert takes_kwargs or declared <= set(params), (node_id, declared - set(params))
        if hasattr(cls, "IS_CHANGED"):
            changed = inspect.signature(cls.IS_CHANGED).parameters
            assert any(p.kind is p.VAR_KEYWORD for p in changed.values()) or declared <= set(changed), node_id


def test_web_directory_exists_and_holds_javascript(pack):
    web = (REPO_ROOT / pack.WEB_DIRECTORY).resolve()
    assert web.is_dir()
    scripts = sorted(p.relative_to(web).as_posix() for p in web.rglob("*.js"))
    assert "stepvideo.js" in scripts
    main = (web / "stepvideo.js").read_text()
    assert 'from "../../scripts/app.js"' in main and "app.registerExtension(" in main
    # every other served .js must be loadable on its own: no app.js import, no side effects needed
    for rel in scripts:
        if rel != "stepvideo.js":
            assert "scripts/app.js" not in (web / rel).read_text(), rel


def test_pyproject_packages_only_the_core():
    """A wheel holding a top-level `nodes` package would shadow ComfyUI's own `nodes`."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert data["tool"]["setuptools"]["packages"]["find"]["include"] == ["stepvideo_core*"]
    assert data["tool"]["comfy"]["PublisherId"] and data["project"]["urls"]["Repository"]


def test_requirements_leave_torch_to_the_user():
    lines = [l.split("#")[0].strip() for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    names = {l.split("=")[0].split("<")[0].split(">")[0].strip().lower() for l in lines if l}
    assert "torch" not in names and {"safetensors", "transformers"} <= names
