"""Finding ComfyUI's modules: the one door through which the bridge imports anything of ComfyUI.

Every other bridge module asks :func:`_comfy` for a ComfyUI module by name and takes None to mean
"not inside ComfyUI", falling back to its plain-Python stand-in. Lookups are cached in
:data:`_MODULES`, which is also how tests swap a ComfyUI module for a fake:
``monkeypatch.setitem(comfy_bridge._MODULES, "comfy.model_management", fake)`` (or ``None`` to
force "absent"). Outside ComfyUI every lookup simply answers None.
"""

from __future__ import annotations

import importlib
import sys

_MISSING = object()
# ComfyUI module name -> the module, or None when it is not importable (cached; tests put fakes here).
_MODULES: dict = {}


def _comfy(name: str):
    """Return the ComfyUI module `name` (e.g. "folder_paths"), or None outside ComfyUI.

    Exists so every ComfyUI import of the pack goes through one cached, failure-tolerant
    door. Only ImportError means "not inside ComfyUI"; any other error is a real bug and
    propagates.
    """
    mod = _MODULES.get(name, _MISSING)
    if mod is _MISSING:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            mod = None
        _MODULES[name] = mod
    return mod


def _already_imported(name: str):
    """Return the module `name` only if something else imported it already (or a test faked it), else None.

    For modules that importing would start ComfyUI's machinery (its ``server``): inside ComfyUI
    ``main.py`` has imported them before any pack loads, so the pack must never be the first.
    """
    mod = _MODULES.get(name, _MISSING)
    if mod is _MISSING:
        mod = sys.modules.get(name) if in_comfyui() else None
    return mod


def in_comfyui() -> bool:
    """Return True when ComfyUI's ``folder_paths`` is importable, i.e. we run inside ComfyUI."""
    return _comfy("folder_paths") is not None
