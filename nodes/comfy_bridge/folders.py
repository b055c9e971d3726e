"""Model folders: where loaders list and find weights, and where the step cache finds calibrations.

Inside ComfyUI the folders come from ``folder_paths`` (ComfyUI's ``models/`` tree and
extra_model_paths.yaml), searched first. Outside ComfyUI -- and after ComfyUI's own folders inside
it -- they come from ``STEPVIDEO_MODELS_DIR``: one or more roots separated by ``os.pathsep``, each
holding ``diffusion_models/``, ``vae/``, ``text_encoders/``, ``loras/`` (and ``stepvideo_cache/``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ...stepvideo_core.checkpoint import SAFETENSORS_SUFFIXES
from .modules import _comfy

ENV_MODELS_DIR = "STEPVIDEO_MODELS_DIR"
MODEL_KINDS = ("diffusion_models", "vae", "text_encoders", "loras")

# For each folder kind, the subfolder that an official `stepvideo-t2v/` root keeps that
# component in; such a root is listed as one entry of that kind.
OFFICIAL_SUBFOLDER = {"diffusion_models": "transformer"}

STEP_CACHE_FOLDER = "stepvideo_cache"  # where the sampler's calibrated step cache looks for its JSON files


def _comfy_folders(kind: str) -> list[Path]:
    """Return ComfyUI's configured folders of `kind` ([] outside ComfyUI or for a kind it does not know)."""
    fp = _comfy("folder_paths")
    if fp is None:
        return []
    try:
        return [Path(p) for p in fp.get_folder_paths(kind)]
    except KeyError:  # a ComfyUI too old to know this folder kind, or a kind nobody registered
        return []


def _env_folders(kind: str) -> list[Path]:
    """Return ``<root>/<kind>`` for each root of ``$STEPVIDEO_MODELS_DIR`` (existing or not), in order."""
    roots = (root.strip() for root in os.environ.get(ENV_MODELS_DIR, "").split(os.pathsep))
    return [Path(root).expanduser() / kind for root in roots if root]


def _unique(paths, existing_only: bool) -> list[Path]:
    """Return `paths` without repeats (the same real folder twice), keeping the first; with
    `existing_only` also without the folders that do not exist."""
    seen, dirs = set(), []
    for d in paths:
        key = os.path.realpath(d)
        if key not in seen and (not existing_only or d.is_dir()):
            seen.add(key)
            dirs.append(d)
    return dirs


def model_dirs(kind: str) -> list[Path]:
    """Return the existing directories searched for models of `kind`, in priority order.

    ComfyUI's configured folders come first (including extra_model_paths.yaml entries),
    then ``$STEPVIDEO_MODELS_DIR/<kind>`` for each root in that variable.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model folder kind {kind!r}; expected one of {MODEL_KINDS}")
    return _unique(_comfy_folders(kind) + _env_folders(kind), existing_only=True)


def is_sharded_folder(path: Path) -> bool:
    """Return True if `path` is a model folder: ``config.json`` plus a ``*.safetensors.index.json``.

    Such a folder (e.g. the official ``transformer/``) is one model, not many files.
    """
    return (path / "config.json").is_file() and any(path.glob("*.safetensors.index.json"))


def is_official_root(path: Path, kind: str) -> bool:
    """Return True if `path` is an official release root holding the `kind` component.

    For ``diffusion_models`` that is a folder (e.g. ``stepvideo-t2v/``) whose
    ``transformer/`` subfolder is a sharded model folder.
    """
    sub = OFFICIAL_SUBFOLDER.get(kind)
    return sub is not None and is_sharded_folder(path / sub)


def _entries_under(base: Path, kind: str) -> list[str]:
    """Return the model entries below `base` as ``/``-separated relative names.

    Official roots and sharded folders count as one entry each and are not descended
    into; elsewhere every weight file is its own entry.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        here = Path(dirpath)
        if here != base and (is_official_root(here, kind) or is_sharded_folder(here)):
            found.append(here.relative_to(base).as_posix())
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(SAFETENSORS_SUFFIXES):
                found.append((here / name).relative_to(base).as_posix())
    return found


def list_model_entries(kind: str) -> list[str]:
    """Return the sorted, de-duplicated model entries of `kind` across all its folders.

    This is what loader combos show. An entry is a single weight file
    (``sub/model.safetensors``) or a model folder (``stepvideo-t2v``,
    ``stepvideo-t2v/transformer``); resolve it with :func:`resolve_model_path`.
    """
    names = set()
    for base in model_dirs(kind):
        names.update(_entries_under(base, kind))
    return sorted(names, key=str.lower)


def resolve_model_path(kind: str, name: str) -> Path:
    """Return the absolute path of entry `name` of `kind` (first folder that has it).

    Raises FileNotFoundError naming every folder searched, so a user whose file is in the
    wrong place sees where the pack looked. Names that climb out of a folder are refused.
    """
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise FileNotFoundError(f"invalid {kind} entry name {name!r}")
    dirs = model_dirs(kind)
    for base in dirs:
        candidate = base / rel
        if candidate.exists():
            return candidate.resolve()
    where = ", ".join(str(d) for d in dirs) or (
        f"no {kind} folder found (inside ComfyUI use models/{kind}; "
        f"outside, set {ENV_MODELS_DIR} to a folder containing {kind}/)"
    )
    raise FileNotFoundError(f"StepVideo: {kind} entry {name!r} not found; searched: {where}")


def step_cache_dirs() -> list[Path]:
    """Return the folders the sampler's calibrated step cache reads ``*.json`` calibrations from, in order.

    Inside ComfyUI: any ``stepvideo_cache`` paths of extra_model_paths.yaml, then
    ``models/stepvideo_cache/`` (``folder_paths.models_dir``); then ``$STEPVIDEO_MODELS_DIR/stepvideo_cache``
    for each root of that variable.  Folders that do not exist are listed too (so a message can say
    where to put a file); reading skips them.
    """
    candidates = _comfy_folders(STEP_CACHE_FOLDER)
    fp = _comfy("folder_paths")
    models_dir = getattr(fp, "models_dir", None) if fp is not None else None
    if models_dir:
        candidates.append(Path(models_dir) / STEP_CACHE_FOLDER)
    return _unique(candidates + _env_folders(STEP_CACHE_FOLDER), existing_only=False)
