"""Reading adapter files and sorting their keys: which trainer module each tensor belongs to, and what it is.

Accepted spellings (detected from the keys; one file may mix them):

* PEFT / diffusers: ``<module>.lora_A.weight`` (down) / ``<module>.lora_B.weight`` (up);
  alpha from ``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``)
  when the file is ``adapter_model*.safetensors`` next to it or a folder is given.
* kohya / musubi: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (also ``lora_transformer_``).  The underscored path is resolved against the
  model's real names later (:class:`~stepvideo_core.lora.fuse.TargetTable`), never by
  replacing ``_`` with ``.``.
* dotted ``lora_down`` / ``lora_up`` / ``alpha`` (ComfyUI, and what our extractor writes).
* full and bias differences: ``<module>.diff`` / ``<module>.diff_b``.

Key prefixes ``base_model.model.``, ``model.diffusion_model.``, ``diffusion_model.``,
``transformer.``, ``pipe.dit.`` and ``dit.`` are removed (also stacked).  Only safetensors
is read; pickles are refused before anything is opened.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..checkpoint import SAFETENSORS_SUFFIXES, CheckpointError, read_header
from ..checks import count_non_finite, finite_float

DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
                   "pipe.dit.", "dit.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "te.")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONFIG_NAME = "adapter_config.json"

# suffix -> kind; the longest matching suffix wins
_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}
# kinds we recognise but cannot apply: reported as such, never silently dropped
_UNSUPPORTED = {
    ".lora_mid.weight": "LoCon/Tucker (lora_mid)",
    ".hada_w1_a": "LoHa", ".hada_w1_b": "LoHa", ".hada_w2_a": "LoHa", ".hada_w2_b": "LoHa",
    ".hada_t1": "LoHa", ".hada_t2": "LoHa",
    ".lokr_w1": "LoKr", ".lokr_w2": "LoKr", ".lokr_w1_a": "LoKr", ".lokr_w1_b": "LoKr",
    ".lokr_w2_a": "LoKr", ".lokr_w2_b": "LoKr", ".lokr_t2": "LoKr",
    ".dora_scale": "DoRA", ".lora_magnitude_vector": "DoRA", ".lora_magnitude_vector.weight": "DoRA",
    ".lora_B.bias": "LoRA bias (lora_bias=True)", ".lora_up.bias": "LoRA bias",
    ".w_norm": "GLoRA/norm", ".b_norm": "GLoRA/norm", ".oft_blocks": "OFT", ".oft_diag": "OFT",
}


class LoraError(ValueError):
    """An adapter cannot be used with this model; the message names keys, shapes and what was found."""


@dataclass
class KeyGroup:
    """All tensors one trainer module contributes: ``kind -> stored key`` (kinds: down, up, alpha, diff, diff_b)."""

    name: str
    underscored: bool
    keys: dict = field(default_factory=dict)
    prefix: str = ""


@dataclass
class AdapterFile:
    """An adapter as read: its tensors (stored names), metadata, PEFT config, and the key grouping."""

    source: Path
    tensors: dict
    metadata: dict
    config: Optional[dict]
    groups: dict = field(default_factory=dict)            # (name, underscored) -> KeyGroup
    unsupported: list = field(default_factory=list)       # (key, reason)
    unknown: list = field(default_factory=list)           # (key, reason)
    styles: set = field(default_factory=set)
    prefixes: set = field(default_factory=set)

    def format_name(self) -> str:
        """What was detected, e.g. "PEFT/diffusers (lora_A/lora_B), prefix 'transformer.'"."""
        order = ("peft", "kohya", "dotted", "diff")
        labels = {"peft": "PEFT/diffusers (lora_A/lora_B)",
                  "kohya": "kohya/musubi (lora_unet_*, lora_down/lora_up/alpha)",
                  "dotted": "module names with lora_down/lora_up/alpha (ComfyUI / StepVideo)",
                  "diff": "full/bias differences (.diff/.diff_b)"}
        text = " + ".join(labels[s] for s in order if s in self.styles) or "no LoRA keys"
        shown = sorted(p for p in self.prefixes if p)
        if shown:
            text += ", prefix " + ", ".join(repr(p) for p in shown)
        return text


def _split_suffix(key: str) -> tuple[str, Optional[str], Optional[str]]:
    """(module part, kind, unsupported reason) of a stored key."""
    best = ""
    for suffix in list(_SUFFIXES) + list(_UNSUPPORTED):
        if key.endswith(suffix) and len(suffix) > len(best):
            best = suffix
    if not best:
        return key, None, None
    return key[:-len(best)], _SUFFIXES.get(best), _UNSUPPORTED.get(best)


def _strip_prefixes(name: str) -> tuple[str, bool, str]:
    """(module name, underscored?, removed prefix) for the module part of a key."""
    removed = ""
    changed = True
    while changed:
        changed = False
        for prefix in DOTTED_PREFIXES:
            if name.startswith(prefix):
                name, removed, changed = name[len(prefix):], removed + prefix, True
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], True, removed + prefix
    return name, False, removed


def resolve_adapter_path(path) -> tuple[Path, Optional[Path]]:
    """(weights file, adapter_config.json or None) for a file or a PEFT folder; refuses pickles.

    A folder must hold ``adapter_model.safetensors`` (or exactly one .safetensors file).
    A file uses an ``adapter_config.json`` beside it only when it is named ``adapter_model*``
    (PEFT's own naming), so one shared folder of unrelated LoRAs is never misread.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        preferred = path / "adapter_model.safetensors"
        files = [preferred] if preferred.is_file() else sorted(
            p for p in path.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES)
        if len(files) != 1:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            hint = f"; it holds pickled files {pickles} which are refused (convert them to .safetensors)" if pickles else ""
            raise LoraError(f"{path}: expected adapter_model.safetensors or a single .safetensors file, "
                            f"found {len(files)} safetensors files{hint}")
        path = files[0]
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path.name}: only .safetensors adapters are loaded; pickled files ({path.suffix}) can run "
                        f"arbitrary code when opened. Convert it to .safetensors first.")
    config = path.parent / CONFIG_NAME
    use_config = config.is_file() and path.name.startswith("adapter_model")
    return path, config if use_config else None


def read_adapter(path) -> AdapterFile:
    """Read an adapter file (or PEFT folder) and group its keys by trainer module.

    Returns an :class:`AdapterFile`; raises :class:`LoraError` for pickles, unreadable files,
    NaN/Inf values (in a tensor or a PEFT alpha: they would turn every video black) and DoRA
    adapters (applying only their low-rank part would be silently wrong).
    """
    file, config_path = resolve_adapter_path(path)
    try:
        read_header(file)
    except CheckpointError as exc:
        raise LoraError(str(exc)) from exc
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    _check_finite_tensors(file, tensors)
    config = None
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise LoraError(f"{config_path} is not valid JSON: {exc}") from exc
        _check_finite_alphas(config, str(config_path))
    elif "lora_adapter_metadata" in metadata:  # diffusers keeps the PEFT config in the file's metadata
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            config = None
        _check_finite_alphas(config, f"{file.name} (lora_adapter_metadata)")
    adapter = AdapterFile(file, tensors, metadata, config)
    _group_keys(adapter)
    dora = [k for k, reason in adapter.unsupported if reason == "DoRA"]
    if dora or (config or {}).get("use_dora"):
        raise LoraError(f"{file.name} is a DoRA adapter ({(dora or ['use_dora in adapter_config.json'])[0]}); "
                        f"DoRA rescales whole weights and is not supported -- applying only its low-rank part "
                        f"would change the model in a way its author did not train.")
    return adapter


def _check_finite_tensors(file: Path, tensors: dict) -> None:
    """Raise LoraError naming the first tensor that holds NaN/Inf, how many values it has, and the file's total."""
    bad = {key: count for key, value in tensors.items() if (count := count_non_finite(value))}
    if not bad:
        return
    key, count = next(iter(bad.items()))
    total = f"; {sum(bad.values())} in {len(bad)} tensors in all" if len(bad) > 1 else ""
    raise LoraError(f"{file.name}: tensor {key!r} holds {count} NaN/Inf value{'s' if count > 1 else ''} "
                    f"(of {tensors[key].numel()}){total}. Such an adapter turns every video black: the file is "
                    f"damaged or was saved from a training run that diverged; download or export it again.")


def _check_finite_alphas(config, source: str) -> None:
    """Raise LoraError when a PEFT config's ``lora_alpha`` or an ``alpha_pattern`` value is not a finite number."""
    if not isinstance(config, dict):
        return
    values = [("lora_alpha", config.get("lora_alpha"))]
    values += [(f"alpha_pattern[{pattern!r}]", value) for pattern, value in (config.get("alpha_pattern") or {}).items()]
    for name, value in values:
        if value is not None:
            try:
                finite_float(value, name)
            except ValueError as exc:
                raise LoraError(f"{source}: {exc}") from None


def _group_keys(adapter: AdapterFile) -> None:
    """Fill ``groups``, ``unsupported``, ``unknown``, ``styles`` and ``prefixes`` of ``adapter``."""
    for key in adapter.tensors:
        module, kind, unsupported = _split_suffix(key)
        if module.startswith(TEXT_ENCODER_PREFIXES):
            adapter.unknown.append((key, "text-encoder key (this loader adapts the DiT only)"))
            continue
        if unsupported:
            adapter.unsupported.append((key, unsupported))
            continue
        if kind is None:
            adapter.unknown.append((key, "not a LoRA/diff tensor name"))
            continue
        name, underscored, prefix = _strip_prefixes(module)
        group = adapter.groups.setdefault((name, underscored), KeyGroup(name, underscored, prefix=prefix))
        if kind in group.keys:
            adapter.unknown.append((key, f"second {kind} tensor for {name} (also {group.keys[kind]})"))
            continue
        group.keys[kind] = key
        adapter.prefixes.add(prefix)
        if kind in ("diff", "diff_b"):
            adapter.styles.add("diff")
        elif key.endswith((".lora_A.weight", ".lora_B.weight")):
            adapter.styles.add("peft")
        elif kind in ("down", "up"):
            adapter.styles.add("kohya" if underscored else "dotted")


def peft_alpha(config: Optional[dict], name: str, rank: int) -> Optional[float]:
    """alpha for module ``name`` from a PEFT config (``alpha_pattern`` first, then ``lora_alpha``), or None.

    With ``use_rslora`` the returned value is rescaled so that ``alpha / rank`` equals
    PEFT's ``lora_alpha / sqrt(rank)``.
    """
    if not config:
        return None
    alpha = None
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        try:
            hit = name == pattern or re.fullmatch(rf"(.*\.)?{pattern}", name) is not None
        except re.error:
            hit = False
        if hit:
            alpha = float(value)
            break
    if alpha is None and config.get("lora_alpha") is not None:
        alpha = float(config["lora_alpha"])
    if alpha is not None and config.get("use_rslora"):
        alpha = alpha * rank / rank ** 0.5
    return alpha


def tensor_scalar(t: torch.Tensor) -> float:
    """A one-element tensor (kohya ``.alpha``) as a float."""
    if t.numel() != 1:
        raise LoraError(f"alpha tensor has {t.numel()} values, expected one (shape {list(t.shape)})")
    return float(t.reshape(()).float())
