"""Step-Video LoRAs on ComfyUI's native MODEL -- and the one place the pack hooks ComfyUI's LoRA code.

A native Step-Video MODEL is a ComfyUI ``ModelPatcher`` whose ``model.diffusion_model`` is the
pack's :class:`~stepvideo_core.dit.StepVideoTransformer` (or a subclass), so its state dict holds
the checkpoint names under ``diffusion_model.``.  That is the only thing this module relies on:
a Step-Video model is recognised by ``isinstance(model.diffusion_model, StepVideoTransformer)``
and nothing else.  Without ComfyUI everything here degrades to "not installed" / "not a MODEL";
no ComfyUI module is imported at import time (they come through :mod:`.comfy_bridge`).

**The hook** (:func:`install`).  ComfyUI decides which LoRA tensor names mean which weight in
``comfy.lora.model_lora_keys_unet(model, key_map)``: ``isinstance`` checks per model family, no
registry or extension point (v0.33 has none for LoRA names; ``comfy.lora_convert.convert_lora``
sees the file but not the model, so it cannot know a name is meant for Step-Video).  The pack
therefore wraps two functions of ``comfy.lora`` at import time, both pass-throughs for every
other model:

* ``model_lora_keys_unet``: calls ComfyUI's own function, then -- only when the model's diffusion
  model is a Step-Video DiT -- adds every name the pack's own reader accepts (the tables of
  :class:`~stepvideo_core.lora.fuse.TargetTable`: official, diffusers ``to_q``/``to_out.0``,
  ``q_proj``/``o_proj``, ``wq``/``wo`` ... under the reader's prefixes ``transformer.``,
  ``diffusion_model.``, ``base_model.model.`` ..., and the kohya/musubi ``lora_unet_`` /
  ``lora_transformer_`` underscore spellings), never replacing an entry ComfyUI made.
* ``load_lora``: calls ComfyUI's own function, then splits the patches of split q/k/v names
  (below).  It only acts on keys carrying a :class:`SlotRows` marker, which only the key map above
  creates; anything else is returned untouched (the very same dict).

Both wrappers are installed once per copy of the pack (installing again is a no-op), keep
ComfyUI's function as ``__wrapped__``, and are what ``LoraLoader``/``LoraLoaderModelOnly``, hook
LoRAs (``comfy.hooks``) and bypass LoRAs (``load_bypass_lora_for_models``) all go through.

**Split q/k/v into the fused rows.**  Step-Video's self-attention has one fused ``wqkv`` [3D, D]
whose rows are grouped per head (reference section 2.3): with ``P`` parts (3 for ``wqkv``, 2 for
the cross-attention ``wkv``), head dim ``d`` and ``H`` heads, part ``i`` (q=0, k=1, v=2) of head
``h`` is rows ``[(hP+i)d, (hP+i)d + d)``.  A trainer's split ``to_q`` is [D, D] with head ``h`` at
rows ``[hd, hd + d)``.  ComfyUI's patch formats address a part of a weight only as one contiguous
``(dim, offset, size)`` slice (``weight.narrow``), and part ``i`` is ``H`` runs separated by
``(P-1)d`` rows, so for ``H > 1`` no single slice covers it; a ``(key, offset, function)`` patch
does not help either, since ComfyUI reshapes ``up @ down`` to the slice's shape before the function
sees it.  What the format can express is one slice per head, and a LoRA splits exactly along rows:

    (B A)[hd : hd+d, :] = B[hd : hd+d, :] A          (a row of a product only uses the same row of B)

so the split LoRA ``s * alpha/r * B A`` equals ``H`` ComfyUI LoRA patches
``(key, (0, (hP+i)d, d)) -> LoRAAdapter(up=B[hd:hd+d], down=A, alpha)`` -- the *up* factor is cut per
head, the *down* factor and alpha are shared (ComfyUI's scale ``alpha / rank`` reads the rank from
``down``, which is unchanged), and the strength multiplies each patch as it would the whole.  A
``.diff`` [D, D] splits the same way (``diff[hd:hd+d]``).  The runs come from
:meth:`~stepvideo_core.lora.fuse.Slot.runs`, the same layout as the pack's own merge
(:meth:`~stepvideo_core.lora.fuse.Slot.of_weight`).  ComfyUI's ``load_lora`` still produces the
whole patch first (so it counts the tensors as loaded and logs only the truly unused ones); the
``load_lora`` wrapper replaces it by the per-head patches.  Without the wrapper (another loader
using the key map) the marker patch is harmless: ComfyUI cannot reshape ``[D, D]`` to ``[3D, D]``,
logs an error and leaves the weight unchanged.  LoRA types that do not split by rows (DoRA, LoCon
mid, LoHa/LoKr/OFT on a split q/k/v) are dropped with a warning.  Bypass-mode LoRAs skip sliced
patches altogether (ComfyUI's bypass loader only takes whole weights, Flux's fused qkv likewise).

**What ComfyUI does not patch.**  ComfyUI's ModelPatcher patches the parameters of leaf layers
only (:func:`comfy_patchable`): the modulation tables (``scale_shift_table`` of every block and of
the model) are accepted by ``add_patches`` and then never applied.  Their names are therefore left
out of the key map (ComfyUI then logs ``lora key not loaded`` for them -- except under
``diffusion_model.``, ComfyUI's own generic name, which it accepts and ignores), and
StepVideoLoraLoader reports them as not applied on a MODEL.  The pack's own sampler path applies them.

**StepVideoLoraLoader on a MODEL** (:func:`apply_to_model`): the pack's reader binds the adapter
(same names, alpha rules, PEFT configs, reports as for a STEPVIDEO_MODEL) and every
:class:`~stepvideo_core.lora.adapter.Patch` becomes ComfyUI patches on a clone of the patcher
(whole weights, per-head slices as above, ``.diff``/``.diff_b``), so ComfyUI's machinery applies,
offloads ("lowvram": computed per layer on use) and removes them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import threading
import weakref
from typing import Optional

from ..stepvideo_core.dit import StepVideoTransformer
from ..stepvideo_core.lora.formats import DOTTED_PREFIXES, KOHYA_PREFIXES
from ..stepvideo_core.lora.fuse import Slot, Target, TargetTable, resolve_module
from . import comfy_bridge as bridge

log = logging.getLogger("StepVideo")

MODEL_PREFIX = "diffusion_model."   # where BaseModel keeps the diffusion model's state dict
_OWNER = __name__                   # marks this copy's wrappers (the pack may be imported under several names)
_LOCK = threading.Lock()
_KEY_MAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # DiT -> its LoRA names (per structure)


# --------------------------------------------------------------------------- recognising a Step-Video MODEL


def stepvideo_dit(model) -> Optional[StepVideoTransformer]:
    """The Step-Video DiT of a ComfyUI BaseModel (``model.diffusion_model``), or None for any other model."""
    dit = getattr(model, "diffusion_model", None)
    return dit if isinstance(dit, StepVideoTransformer) else None


def is_native_model(value) -> bool:
    """True when ``value`` looks like a ComfyUI MODEL (a ModelPatcher: ``.model``, ``clone``, ``add_patches``)."""
    return (hasattr(value, "model") and callable(getattr(value, "add_patches", None))
            and callable(getattr(value, "clone", None)))


# --------------------------------------------------------------------------- the key map


@dataclasses.dataclass(frozen=True)
class SlotRows:
    """Marker in a key-map value ``(key, None, SlotRows)``: the LoRA means one q/k/v part of a fused weight.

    Stands where ComfyUI keeps a patch's ``function`` (called, it returns its input unchanged), so a
    patch that reaches ComfyUI unsplit is a no-op-with-an-error rather than a wrong update.  Distinct
    per part, so q, k and v of one layer never collide in ComfyUI's patch dict.
    """

    slot: Slot
    fused_rows: int

    def runs(self) -> list[tuple[int, int]]:
        """(first fused row, rows) per head; the split tensor's head h is rows [h*d, h*d + d)."""
        return self.slot.runs(self.fused_rows)

    def __call__(self, tensor):
        return tensor


def comfy_patchable(dit: StepVideoTransformer, target: Target) -> bool:
    """True when ComfyUI's ModelPatcher patches ``target``'s tensor at all.

    ComfyUI (v0.33, ``ModelPatcher._load_list``) patches the parameters of *leaf* layers only;
    a parameter owned by a module that also has sublayers with parameters -- Step-Video's
    modulation tables ``scale_shift_table`` of each block and of the model -- is never loaded as a
    layer, so a patch on it is accepted and then silently not applied.
    """
    module = resolve_module(dit, target)
    return not any("." in name for name, _ in module.named_parameters())


NOT_PATCHED = ("ComfyUI's ModelPatcher does not patch parameters of modules that have sublayers (the "
               "modulation tables); StepVideoLoraLoader on a STEPVIDEO_MODEL applies it")


def _core_value(target: Target, tensors: dict):
    """The key-map value for ``target``: the state-dict key, or ``(key, None, SlotRows)`` for a q/k/v part."""
    key = MODEL_PREFIX + target.tensor_name
    if target.slot is None:
        return key
    return (key, None, SlotRows(target.slot, int(tensors[target.tensor_name].shape[0])))


def stepvideo_key_map(dit: StepVideoTransformer) -> dict:
    """Every LoRA module name the pack's reader accepts for ``dit`` -> ComfyUI key-map value (cached per DiT).

    Built from :class:`~stepvideo_core.lora.fuse.TargetTable` (one source of truth for the names):
    dotted names bare and under each of the reader's prefixes, underscored names under the kohya
    prefixes; ambiguous underscore spellings are left out (the pack's reader refuses them too), and so
    are tensors ComfyUI never patches (:func:`comfy_patchable`), so that ComfyUI reports such keys
    as not loaded instead of accepting them silently.
    """
    cached = _KEY_MAPS.get(dit)
    if cached is not None:
        return cached
    table = TargetTable(dit)
    tensors = {**dict(dit.named_parameters()), **dict(dit.named_buffers())}
    out: dict = {}
    usable = {}  # target -> patchable by ComfyUI (many names share one target)

    def wanted(target) -> bool:
        if target is None or target.tensor_name not in tensors:
            return False
        if target not in usable:
            usable[target] = comfy_patchable(dit, target)
        return usable[target]

    for name, target in table.dotted.items():
        if not wanted(target):
            continue
        value = _core_value(target, tensors)
        for prefix in ("",) + DOTTED_PREFIXES:
            out.setdefault(prefix + name, value)
    for name, target in table.underscored.items():
        if not wanted(target):
            continue
        value = _core_value(target, tensors)
        for prefix in KOHYA_PREFIXES:
            out.setdefault(prefix + name, value)
    _KEY_MAPS[dit] = out
    return out


def _extend_key_map(model, key_map: dict) -> dict:
    """Add the Step-Video names to ``key_map`` (in place) when ``model`` is a Step-Video model; else untouched."""
    dit = stepvideo_dit(model)
    if dit is None or key_map is None:
        return key_map
    before = len(key_map)
    for name, value in stepvideo_key_map(dit).items():
        key_map.setdefault(name, value)
    log.debug("StepVideo: %d LoRA names added to ComfyUI's key map", len(key_map) - before)
    return key_map


# --------------------------------------------------------------------------- splitting q/k/v patches


def _is_marker(key) -> bool:
    return isinstance(key, tuple) and len(key) == 3 and isinstance(key[2], SlotRows)


def _split_value(value, local: slice, lora_adapter_cls):
    """The part of one ComfyUI patch value that touches split rows ``local`` (None when it does not split)."""
    if lora_adapter_cls is not None and type(value) is lora_adapter_cls:
        up, down, alpha, mid, dora_scale, reshape = value.weights
        if mid is not None or dora_scale is not None or reshape is not None:
            return None
        return lora_adapter_cls(value.loaded_keys, (up[local], down, alpha, None, None, None))
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("diff", "set") and isinstance(value[1], tuple):
        return (value[0], (value[1][0][local],))
    return None


def _rows_of(value, lora_adapter_cls) -> Optional[int]:
    """Rows of the split tensor a patch value carries (LoRA up, diff, set), or None."""
    if lora_adapter_cls is not None and type(value) is lora_adapter_cls:
        return int(value.weights[0].shape[0])
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], tuple) and value[1]:
        return int(value[1][0].shape[0])
    return None


def slot_patches(key: str, marker: SlotRows, value, lora_adapter_cls=None) -> Optional[dict]:
    """``{(key, (0, row, d)): part}`` per head for a whole split-q/k/v patch ``value``; None when it cannot split.

    ``value`` is what ComfyUI's ``load_lora`` made (a ``LoRAAdapter``, ``("diff", (tensor,))`` or
    ``("set", (tensor,))``) for the split projection; see the module docstring for why the parts
    are exact.
    """
    runs = marker.runs()
    head_dim = marker.slot.head_dim
    if _rows_of(value, lora_adapter_cls) != len(runs) * head_dim:
        return None
    out = {}
    for h, (start, size) in enumerate(runs):
        part = _split_value(value, slice(h * head_dim, h * head_dim + size), lora_adapter_cls)
        if part is None:
            return None
        out[(key, (0, start, size))] = part
    return out


def _describe(value) -> str:
    return type(value).__name__ if not isinstance(value, tuple) else f"{value[0]!r} patch"


def _split_markers(patch_dict: dict) -> dict:
    """Replace every marker entry of ComfyUI's ``load_lora`` result by its per-head patches (in place)."""
    markers = [k for k in patch_dict if _is_marker(k)]
    if not markers:
        return patch_dict
    adapters = bridge._comfy("comfy.weight_adapter")
    lora_cls = getattr(adapters, "LoRAAdapter", None)
    for marker_key in markers:
        value = patch_dict.pop(marker_key)
        key, _, marker = marker_key
        parts = slot_patches(key, marker, value, lora_cls)
        if parts is None:
            names = sorted(getattr(value, "loaded_keys", ()) or ())
            log.warning("StepVideo LoRA: %s for the %s rows of %s cannot be split into the head-interleaved rows "
                        "(only plain LoRA, .diff and .set_weight can); not applied%s", _describe(value),
                        marker.slot.name, key, f" ({', '.join(names[:4])})" if names else "")
            continue
        patch_dict.update(parts)
    return patch_dict


# --------------------------------------------------------------------------- installing the hook


def _owned(function) -> bool:
    """True when this copy's wrapper is ``function`` or anywhere in its ``__wrapped__`` chain."""
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        if getattr(function, "_stepvideo_owner", None) == _OWNER:
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def _wrap_key_map(original):
    @functools.wraps(original)
    def model_lora_keys_unet(model, *args, **kwargs):
        key_map = original(model, *args, **kwargs)
        return _extend_key_map(model, key_map)

    model_lora_keys_unet._stepvideo_owner = _OWNER
    return model_lora_keys_unet


def _wrap_load_lora(original):
    @functools.wraps(original)
    def load_lora(*args, **kwargs):
        return _split_markers(original(*args, **kwargs))

    load_lora._stepvideo_owner = _OWNER
    return load_lora


_WRAPPERS = (("model_lora_keys_unet", _wrap_key_map), ("load_lora", _wrap_load_lora))


def install() -> bool:
    """Wrap ``comfy.lora.model_lora_keys_unet`` and ``comfy.lora.load_lora`` (see the module docstring).

    Idempotent (a second call changes nothing); returns True when the hook is in place, False
    outside ComfyUI or when this ComfyUI lacks either function (logged; LoRAs then only work
    through StepVideoLoraLoader).
    """
    lora = bridge._comfy("comfy.lora")
    if lora is None:
        return False
    with _LOCK:
        missing = [name for name, _ in _WRAPPERS if not callable(getattr(lora, name, None))]
        if missing:
            log.warning("StepVideo: this ComfyUI's comfy.lora has no %s; core LoRA loaders will not know "
                        "Step-Video's LoRA names (StepVideoLoraLoader still applies them)", ", ".join(missing))
            return False
        for name, wrap in _WRAPPERS:
            current = getattr(lora, name)
            if not _owned(current):
                setattr(lora, name, wrap(current))
    return True


def installed() -> bool:
    """True when this copy's hook wraps both functions of ``comfy.lora`` (False outside ComfyUI)."""
    lora = bridge._comfy("comfy.lora")
    return lora is not None and all(_owned(getattr(lora, name, None)) for name, _ in _WRAPPERS)


def install_if_loaded() -> bool:
    """:func:`install` when ComfyUI has already imported ``comfy.lora`` (inside ComfyUI, before any pack
    loads); otherwise nothing -- importing the pack never imports ComfyUI."""
    if "comfy.lora" not in sys.modules:
        return False
    return install()


# --------------------------------------------------------------------------- StepVideoLoraLoader on a MODEL


@dataclasses.dataclass
class NativeResult:
    """What :func:`apply_to_model` did: the new patcher, patch counts and what could not be applied."""

    model: object
    patches: int = 0
    tensors: int = 0
    sliced: int = 0
    skipped: list = dataclasses.field(default_factory=list)   # (stored keys, reason)

    def summary(self) -> str:
        text = f"{self.patches} ComfyUI weight patches on {self.tensors} tensors"
        if self.sliced:
            text += f" ({self.sliced} of them per-head row slices for split q/k/v)"
        return text


def core_patches(entry, dit: StepVideoTransformer, state_keys, lora_adapter_cls) -> tuple[list, list]:
    """The selected patches of ``entry`` (a :class:`~stepvideo_core.lora.LoraEntry`) as ComfyUI patches.

    Returns ``(items, skipped)``: ``items`` are ``(patch key, patch value)`` pairs for
    ``ModelPatcher.add_patches`` (the adapter's alpha/rank folded into the LoRA alpha, strength left
    to add_patches); ``skipped`` lists ``(stored keys, reason)`` for patches ComfyUI cannot hold (a
    bias difference for a layer without a bias parameter, which the pack's own path adds to the
    output) or would not apply (:func:`comfy_patchable`).
    """
    items, skipped = [], []
    tensors = {**dict(dit.named_parameters()), **dict(dit.named_buffers())}
    for patch in entry.selected():
        target = patch.target
        key = MODEL_PREFIX + target.tensor_name
        if key not in state_keys or target.tensor_name not in tensors:
            skipped.append((patch.keys, f"{target.module or 'the model'} has no {target.leaf} parameter for ComfyUI "
                                        f"to patch; the pack's own path adds it to the layer's output"))
            continue
        if not comfy_patchable(dit, target):
            skipped.append((patch.keys, f"{target.tensor_name}: {NOT_PATCHED}"))
            continue
        if patch.kind == "lowrank":
            value = lora_adapter_cls(set(patch.keys), (patch.up, patch.down, patch.scale * patch.rank,
                                                       None, None, None))
        else:
            value = ("diff", (patch.diff,))
        if target.slot is None:
            items.append((key, value))
            continue
        marker = SlotRows(target.slot, int(tensors[target.tensor_name].shape[0]))
        parts = slot_patches(key, marker, value, lora_adapter_cls)
        if parts is None:  # cannot happen for shapes the reader validated; kept as a guard
            skipped.append((patch.keys, f"{target.describe()}: rows do not split per head"))
            continue
        items.extend(parts.items())
    return items, skipped


def _rounds(items: list) -> list[dict]:
    """``items`` as dicts with unique keys, in order (two patches on one tensor go to two add_patches calls)."""
    rounds: list[dict] = []
    for key, value in items:
        for bucket in rounds:
            if key not in bucket:
                bucket[key] = value
                break
        else:
            rounds.append({key: value})
    return rounds


def apply_to_model(model, entry) -> NativeResult:
    """A clone of the ModelPatcher ``model`` with ``entry``'s patches added as ComfyUI patches at its strength.

    Raises ValueError when ``model`` is not a Step-Video MODEL or ComfyUI is not importable.
    """
    dit = stepvideo_dit(getattr(model, "model", None))
    if dit is None:
        raise ValueError(stepvideo_model_error(model))
    adapters = bridge._comfy("comfy.weight_adapter")
    lora_cls = getattr(adapters, "LoRAAdapter", None)
    if lora_cls is None:
        raise ValueError("StepVideo: applying a LoRA to a ComfyUI MODEL needs ComfyUI's comfy.weight_adapter")
    clone = model.clone()
    state_keys = set(clone.model.state_dict().keys())
    items, skipped = core_patches(entry, dit, state_keys, lora_cls)
    result = NativeResult(clone, skipped=skipped)
    for bucket in _rounds(items):
        added = clone.add_patches(bucket, entry.strength)
        missing = [k for k in bucket if k not in set(added)]
        if missing:  # state_keys were checked above, so this means ComfyUI changed what add_patches accepts
            raise ValueError(f"StepVideo: ComfyUI refused {len(missing)} LoRA patches, e.g. {missing[0]!r}")
        result.patches += len(bucket)
    result.tensors = len({k if isinstance(k, str) else k[0] for k, _ in items})
    result.sliced = sum(1 for k, _ in items if not isinstance(k, str))
    return result


def stepvideo_model_error(model) -> str:
    """Why ``model`` cannot take a Step-Video LoRA (for the node's error)."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    kind = type(inner).__name__ if inner is not None else type(model).__name__
    return (f"StepVideo LoRA Loader: this MODEL is not a Step-Video model (its diffusion model is {kind}); "
            f"use ComfyUI's LoRA loaders for other models")


install_if_loaded()  # inside ComfyUI: ComfyUI imported comfy.lora before loading any pack
