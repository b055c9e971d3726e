"""Step cache: skip DiT evaluations whose output barely changes, reusing the last velocity instead.

:class:`StepCache` is the settings object :func:`~stepvideo_core.sampling.sample` takes as ``cache``;
:class:`CacheRun` applies it to one run.  Three modes:

``"off"`` (default)
    Every step calls the DiT: the run is bit-identical to a sampler without a cache (the
    run only counts the DiT calls for the summary).

``"adaptive"`` (EasyCache-style, needs no calibration)
    After each real DiT call at step ``b`` the *transformation rate* of the last two real
    calls ``a < b`` is measured, ``k = mean|v_b - v_a| / mean|x_b - x_a|`` (``x`` the latents
    the DiT saw, ``v`` the velocity it gave, guided), with the output scale ``mean|v_b|``.
    Before step ``i`` the relative output change is estimated from the input change of
    that step, ``k * mean|x_i - x_{i-1}| / mean|v_b|``, and added to an accumulator that
    is reset to 0 by every real call.  While the accumulator stays under ``threshold``
    the step reuses ``v_b``.  Two real calls are needed before any skip (no rate yet).

``"calibrated"`` (MagCache-style)
    One uncached calibration run measured the magnitude ratio of successive velocities
    per step, ``r_i = mean over tokens of ||v_i|| / ||v_{i-1}||`` (norm over the 64 latent
    channels, :func:`magnitude_ratio`), stored in a small JSON (:class:`Calibration`,
    ``python -m stepvideo_core calibrate-cache``).  Before step ``i`` the accumulated ratio
    since the last real call ``R = prod r`` and the accumulated error ``E = sum |1 - R|``
    are updated; the step reuses the last velocity while ``E < threshold`` and at most
    ``max_skips`` steps in a row were reused (default 2); a real call resets ``R = 1``,
    ``E = 0``.  The ratios depend on the weights, the preset and the step count, so a
    calibration is keyed by all three (:func:`model_identity`) and a mismatch is an error.

What is reused, and why: the last *velocity* (guided, as the Euler step used it), not "last
output minus last input added to the new input" (EasyCache's residual form).  Step-Video
predicts a flow-matching velocity (data minus noise), which is constant along an ideally
straight path while the input keeps moving; the residual form would add the latents' own
drift since the last real call (``sum v * dt``) to the velocity, an error proportional to
the sigma distance, on top of the velocity's real change.

Rules common to both modes (:meth:`StepCache.window`): step ``i`` (0-based, of ``steps``)
may reuse only when ``start <= i / steps < end``; never the first step and never the last
one.  The two CFG branches are cached together: one decision per step, the guided velocity
is reused, so a skipped step makes no DiT call at all, whether CFG runs as one batched
call or one branch at a time (and the block streamer moves no weights for it).
``threshold`` 0 never skips: bit-identical to ``"off"``.

The pack ships no calibration it has not measured: calibrated mode needs a file made with
``calibrate-cache`` for the user's own weights.  Random weights (the tiny model, the bench)
do not predict how well any threshold keeps real-weight quality.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from ..checks import finite_float

log = logging.getLogger("StepVideo")

CACHE_MODES = ("off", "adaptive", "calibrated")
DEFAULT_THRESHOLDS = {"off": 0.0, "adaptive": 0.2, "calibrated": 0.2}  # EasyCache's default, for both
DEFAULT_START, DEFAULT_END = 0.2, 0.95
DEFAULT_MAX_SKIPS = {"off": None, "adaptive": None, "calibrated": 2}
CALIBRATION_FORMAT = "stepvideo-step-cache"
CALIBRATION_VERSION = 1
CALIBRATION_FILE = "step_cache.json"  # the CLI's default file; the nodes read models/stepvideo_cache/*.json
CACHE_FOLDER = "stepvideo_cache"
_TINY = 1e-12
_FINGERPRINT_SAMPLES = 1024

PathLike = Union[str, Path]


class CalibrationNotFound(ValueError):
    """No calibration matches this model, preset and step count (the message says what exists and how to make one)."""


# --------------------------------------------------------------------------------- model identity


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    """Up to :data:`_FINGERPRINT_SAMPLES` evenly spaced values of ``tensor``, rounded to bf16, as bytes."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n > _FINGERPRINT_SAMPLES:
        index = torch.linspace(0, n - 1, _FINGERPRINT_SAMPLES, device=flat.device).round().long()
        flat = flat[index]
    return flat.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()


def model_identity(model: torch.nn.Module) -> str:
    """What a calibration is keyed by: ``"<variant>/<config hash>/<weights fingerprint>"``.

    The fingerprint hashes a fixed sample of every tensor that is stored alike in every weight
    format (all non-block tensors, and the blocks' norms and modulation tables -- not the
    blocks' Linear weights, which fp8_scaled stores differently), rounded to bf16: the same
    release loaded in bf16, fp16, fp32 or fp8_scaled has one identity; the base model, Turbo
    and TI2V (or a fine-tune) have different ones.  LoRAs are not part of it: the node and the
    pipeline take it before attaching them (a merged LoRA changes weights in place for the run).
    Raises ValueError for a model on the meta device (no weights to fingerprint).
    """
    config = model.config
    config_hash = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    weights = hashlib.sha256()
    for name, tensor in model.named_parameters():
        if tensor.is_meta:
            raise ValueError("the model is on the meta device: no weights to fingerprint for the step cache")
        if tensor.dtype.itemsize == 1 or not tensor.is_floating_point():
            continue
        if name.startswith("transformer_blocks.") and tensor.ndim >= 2 and not name.endswith("scale_shift_table"):
            continue
        weights.update(name.encode())
        weights.update(_sample_bytes(tensor))
    return f"{config.variant}/{config_hash[:8]}/{weights.hexdigest()[:16]}"


# --------------------------------------------------------------------------------- calibration


def magnitude_ratio(v: torch.Tensor, v_prev: torch.Tensor) -> float:
    """MagCache's ratio of two velocities ``[B, F, C, h, w]``: mean over tokens of ||v|| / ||v_prev|| (norm over C)."""
    now = v.float().norm(dim=2)
    before = v_prev.float().norm(dim=2)
    return float((now / before.clamp_min(_TINY)).mean())


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-step magnitude ratios of one uncached run (``ratios[0]`` is 1: no step before it).

    Keyed by ``model`` (:func:`model_identity`), ``preset`` and ``steps``; the other fields
    record how it was measured (``cfg``/``shift`` as run, the video size, seed, prompt,
    device, dtype, date).
    """

    model: str
    preset: str
    steps: int
    ratios: tuple
    cfg: Optional[float] = None
    shift: Optional[float] = None
    label: str = ""
    measured: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(finite_float(r, "a magnitude ratio") for r in self.ratios))
        object.__setattr__(self, "steps", int(self.steps))
        if len(self.ratios) != self.steps:
            raise ValueError(f"a calibration of {self.steps} steps needs {self.steps} ratios, got {len(self.ratios)}")

    @property
    def key(self) -> tuple:
        return (self.model, self.preset, self.steps)

    def describe(self) -> str:
        label = f" ({self.label})" if self.label else ""
        return f"{self.model}{label}, {self.preset}, {self.steps} steps"

    def to_json(self) -> dict:
        return {"model": self.model, "label": self.label, "preset": self.preset, "steps": self.steps,
                "cfg": self.cfg, "shift": self.shift, "ratios": list(self.ratios),
                "measured": dict(self.measured)}

    @classmethod
    def from_json(cls, data: dict, source: str = "calibration") -> "Calibration":
        try:
            return cls(model=str(data["model"]), preset=str(data["preset"]), steps=int(data["steps"]),
                       ratios=tuple(data["ratios"]), cfg=data.get("cfg"), shift=data.get("shift"),
                       label=str(data.get("label", "")), measured=dict(data.get("measured") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: not a step-cache calibration entry ({exc})") from None


def calibration_from_stats(stats: dict, *, preset: str, cfg: float, shift: float, label: str = "",
                           **measured) -> Calibration:
    """A :class:`Calibration` from the stats of a run sampled with ``StepCache(record_ratios=True)``.

    The run put the model's identity and its per-step ratios there; ``measured`` (size, seed,
    device...) is stored as given, with the date and the torch version.
    """
    if "ratios" not in stats or "model" not in stats:
        raise ValueError("these stats come from a run that recorded no ratios (sample with "
                         "cache=StepCache(record_ratios=True), stats=...)")
    if len(stats["ratios"]) != stats.get("steps", len(stats["ratios"])):
        raise ValueError(f"the recording run stopped after {len(stats['ratios'])} of {stats['steps']} steps")
    measured.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S"))
    measured["torch"] = torch.__version__
    return Calibration(model=stats["model"], preset=preset, steps=len(stats["ratios"]),
                       ratios=tuple(stats["ratios"]), cfg=float(cfg), shift=float(shift), label=label,
                       measured=measured)


def load_calibrations(path: PathLike) -> list[Calibration]:
    """Every entry of one calibration JSON file; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a step-cache calibration ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path}: not a step-cache calibration file (no \"format\": \"{CALIBRATION_FORMAT}\"); "
                         f"make one with python -m stepvideo_core calibrate-cache")
    if int(data.get("version", 0)) > CALIBRATION_VERSION:
        raise ValueError(f"{path}: calibration format version {data.get('version')} is newer than this pack's "
                         f"({CALIBRATION_VERSION}); update the pack or calibrate again")
    return [Calibration.from_json(entry, f"{path} entry {i}") for i, entry in enumerate(data.get("entries", []))]


def save_calibration(path: PathLike, calibration: Calibration) -> Path:
    """Add ``calibration`` to the JSON file at ``path`` (created if missing), replacing an entry with its key."""
    path = Path(path)
    entries = load_calibrations(path) if path.exists() else []
    entries = [e for e in entries if e.key != calibration.key] + [calibration]
    data = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
            "note": "Step-cache calibration measured by python -m stepvideo_core calibrate-cache on the weights "
                    "named by each entry's model identity; valid only for that model, preset and step count.",
            "entries": [e.to_json() for e in entries]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def calibration_files(sources: Iterable[PathLike]) -> list[Path]:
    """The calibration files ``sources`` name: files as given, folders as their ``*.json`` (sorted)."""
    files = []
    for source in sources:
        source = Path(source).expanduser()
        if source.is_dir():
            files += sorted(p for p in source.glob("*.json") if p.is_file())
        elif source.is_file():
            files.append(source)
    return files


def find_calibration(sources: Iterable[PathLike], model: Optional[str], preset: str, steps: int) -> Calibration:
    """The calibration of ``(model, preset, steps)`` in ``sources`` (files or folders of ``*.json``).

    ``model`` None matches any model: a check that can run before the weights are loaded.
    Raises :class:`CalibrationNotFound` saying where it looked, what it found there and the
    command that measures the missing one.
    """
    sources = list(sources)
    files = calibration_files(sources)
    found, unreadable = [], []
    for path in files:
        try:
            entries = load_calibrations(path)
        except ValueError as exc:
            unreadable.append(str(exc))
            continue
        for entry in entries:
            if (entry.preset, entry.steps) == (preset, int(steps)) and model in (None, entry.model):
                return entry
            found.append(f"{entry.describe()} [{path.name}]")
    where = ", ".join(str(Path(s).expanduser()) for s in sources) or "nowhere (no folder given)"
    subject = "any model" if model is None else f"this model ({model})"
    lines = [f"no step-cache calibration for {subject}, preset {preset} and {steps} steps; searched {where}"]
    lines.append("found: " + ("; ".join(found) if found else "no calibration entries"))
    lines += unreadable
    lines.append(f"measure one with: python -m stepvideo_core calibrate-cache --models <release folder> --preset "
                 f"{preset} --steps {steps} (the pack ships no calibration it has not measured), or use the "
                 f"adaptive cache, which needs none")
    raise CalibrationNotFound("\n  ".join(lines))


# --------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class StepCache:
    """How :func:`~stepvideo_core.sampling.sample` may skip DiT calls (see the module docstring).

    * ``mode``: "off" (default), "adaptive" or "calibrated".
    * ``threshold``: skip while the accumulated estimate stays under it (None: the mode's default,
      :data:`DEFAULT_THRESHOLDS`); 0 never skips.
    * ``start`` / ``end``: fractions of the steps; step ``i`` may be skipped only when
      ``start <= i/steps < end`` (and never the first or the last step).
    * ``max_skips``: at most this many skipped steps in a row (None: the mode's default, 2 for
      calibrated, unbounded for adaptive).
    * ``calibration``: the :class:`Calibration` of this model, preset and step count (calibrated);
      or ``sources``: calibration files/folders searched by :meth:`resolved` once the model is known.
    * ``record_ratios``: also measure the per-step magnitude ratios into the run's stats
      (``stats["ratios"]``; used by calibrate-cache with mode "off").
    """

    mode: str = "off"
    threshold: Optional[float] = None
    start: float = DEFAULT_START
    end: float = DEFAULT_END
    max_skips: Optional[int] = None
    calibration: Optional[Calibration] = None
    sources: tuple = ()
    record_ratios: bool = False

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache mode must be one of {list(CACHE_MODES)}, got {self.mode!r}")
        if self.threshold is not None:
            threshold = finite_float(self.threshold, "the cache threshold")
            if threshold < 0:
                raise ValueError(f"the cache threshold must not be negative, got {threshold:g}")
            object.__setattr__(self, "threshold", threshold)
        start, end = finite_float(self.start, "cache start"), finite_float(self.end, "cache end")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"cache start and end must be fractions of the steps with 0 <= start <= end <= 1, "
                             f"got start {start:g}, end {end:g}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        if self.max_skips is not None and (int(self.max_skips) != self.max_skips or self.max_skips < 1):
            raise ValueError(f"max_skips must be a positive integer (or None), got {self.max_skips!r}")
        object.__setattr__(self, "sources", tuple(self.sources))

    @property
    def active(self) -> bool:
        """True when the run needs a :class:`CacheRun` (a mode that may skip, or ratios to record)."""
        return self.mode != "off" or self.record_ratios

    @property
    def limit(self) -> float:
        """The threshold in use (the mode's default when None)."""
        return DEFAULT_THRESHOLDS[self.mode] if self.threshold is None else self.threshold

    @property
    def skip_bound(self) -> Optional[int]:
        """The most steps skipped in a row (None: unbounded)."""
        return DEFAULT_MAX_SKIPS[self.mode] if self.max_skips is None else int(self.max_skips)

    def window(self, steps: int) -> range:
        """The 0-based steps that may be skipped: ``start <= i/steps < end``, not 0, not ``steps - 1``."""
        first = max(1, math.ceil(self.start * steps - 1e-9))
        stop = min(steps - 1, math.ceil(self.end * steps - 1e-9))
        return range(first, max(first, stop))

    def resolved(self, model: torch.nn.Module, preset: str, steps: int) -> "StepCache":
        """This cache with its calibration found for ``model``, ``preset`` and ``steps`` (calibrated mode).

        Other modes, and a calibrated cache given its ``calibration``, come back unchanged.
        Raises :class:`CalibrationNotFound` when ``sources`` has none for this run.
        """
        if self.mode != "calibrated" or self.calibration is not None:
            return self
        found = find_calibration(self.sources, model_identity(model), preset, steps)
        return dataclasses.replace(self, calibration=found)

    def check_sources(self, preset: str, steps: int) -> None:
        """Before anything loads: a calibrated cache without a calibration must find one for ``preset`` and
        ``steps`` in its ``sources`` (for some model; the model itself is checked by :meth:`resolved`).

        Raises :class:`CalibrationNotFound`; other modes pass.
        """
        if self.mode == "calibrated" and self.calibration is None:
            find_calibration(self.sources, None, preset, steps)

    def describe(self) -> str:
        """One line for summaries: ``adaptive (threshold 0.2, steps 20%-95%)``."""
        if self.mode == "off":
            return "off"
        bound = f", at most {self.skip_bound} in a row" if self.skip_bound else ""
        return (f"{self.mode} (threshold {self.limit:g}, steps {self.start:.0%}-{self.end:.0%}{bound})")


def summary(stats: dict) -> str:
    """What a run's cache stats say, for the node and CLI summaries.

    ``"step cache adaptive (threshold 0.2, ...): 31 of 50 DiT calls run, 19 skipped (steps 12, 14, ...)"``.
    """
    if not stats:
        return ""
    run, skipped = stats.get("dit_calls", 0), stats.get("skipped_calls", 0)
    text = f"step cache {stats.get('cache', 'off')}: {run} of {run + skipped} DiT calls run, {skipped} skipped"
    steps = stats.get("skipped_steps") or []
    if steps:
        shown = ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")
        text += f" (step{'s' if len(steps) > 1 else ''} {shown})"
    return text


# --------------------------------------------------------------------------------- one run


class CacheRun:
    """The cache rule applied to one sampling run of ``steps`` steps (built by the sampler).

    ``calls_per_step``: the DiT calls one step makes (2 with CFG one branch at a time, else 1);
    ``model``: whose identity a recording run (``record_ratios``) stores in ``stats["model"]``.

    The sampler asks :meth:`reuse` before each step's DiT call(s): a tensor means "skip, use
    this velocity"; None means "call the model", after which it reports the guided velocity
    with :meth:`computed`.  ``stats`` (the dict the caller passed, or a new one) is kept up to
    date as the run goes, so it is complete also after an interrupt.
    """

    def __init__(self, cache: StepCache, steps: int, calls_per_step: int, stats: Optional[dict] = None,
                 model: Optional[torch.nn.Module] = None):
        if cache.mode == "calibrated":
            if cache.calibration is None:
                raise ValueError("the calibrated step cache needs its calibration (StepCache.resolved, or "
                                 "calibration=...); make one with python -m stepvideo_core calibrate-cache")
            if cache.calibration.steps != steps:
                raise CalibrationNotFound(f"the step-cache calibration {cache.calibration.describe()} was measured "
                                          f"for {cache.calibration.steps} steps; this run has {steps}")
        self.cache, self.steps, self.calls_per_step = cache, int(steps), int(calls_per_step)
        self.allowed = set(cache.window(self.steps)) if cache.mode != "off" else set()
        self.stats = stats if stats is not None else {}
        self.stats.update(cache=cache.describe(), mode=cache.mode, steps=self.steps, dit_calls=0,
                          skipped_calls=0, skipped_steps=[])
        if cache.record_ratios:
            self.stats["ratios"] = []
            if model is not None and "model" not in self.stats:  # a caller may have put the base weights' there
                self.stats["model"] = model_identity(model)
        self._v_last = None            # the velocity of the last real call (reused while skipping)
        self._x_last = None            # the latents of the last real call
        self._x_prev = None            # the latents of the previous step (real or skipped)
        self._v_prev = None            # the velocity the previous step used (for recorded ratios)
        self._rate = None              # adaptive: |dv|/|dx| of the last two real calls
        self._out_norm = None          # adaptive: mean|v| of the last real call
        self._accumulated = 0.0        # adaptive: summed estimate / calibrated: summed error
        self._ratio = 1.0              # calibrated: product of ratios since the last real call
        self._in_a_row = 0

    def reuse(self, i: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The velocity step ``i`` reuses instead of calling the DiT, or None to call it (``x``: the latents)."""
        skip = False
        if i in self.allowed and self._v_last is not None:
            bound = self.cache.skip_bound
            if bound is None or self._in_a_row < bound:
                skip = self._adaptive(x) if self.cache.mode == "adaptive" else self._calibrated(i)
        if skip:
            self._in_a_row += 1
            self.stats["skipped_calls"] += self.calls_per_step
            self.stats["skipped_steps"].append(i + 1)
            self._after_step(x, self._v_last)
            return self._v_last
        return None

    def computed(self, i: int, x: torch.Tensor, v: torch.Tensor, calls: int) -> None:
        """Step ``i`` called the DiT ``calls`` times on latents ``x`` and the guided velocity is ``v``."""
        self.stats["dit_calls"] += calls
        if not self.cache.active:
            return  # off: only counted (no tensor kept, nothing measured)
        if self.cache.mode == "adaptive":
            if self._v_last is not None:
                dx = float((x.float() - self._x_last.float()).abs().mean())
                dv = float((v.float() - self._v_last.float()).abs().mean())
                self._rate = dv / max(dx, _TINY)
            self._out_norm = max(float(v.float().abs().mean()), _TINY)
        self._v_last, self._x_last = v, x
        self._accumulated, self._ratio, self._in_a_row = 0.0, 1.0, 0
        self._after_step(x, v)

    def _after_step(self, x: torch.Tensor, v: torch.Tensor) -> None:
        if self.cache.record_ratios:
            self.stats["ratios"].append(1.0 if self._v_prev is None else magnitude_ratio(v, self._v_prev))
        self._x_prev, self._v_prev = x, v

    def _adaptive(self, x: torch.Tensor) -> bool:
        if self._rate is None:
            return False  # one real call so far: no transformation rate measured yet
        change = float((x.float() - self._x_prev.float()).abs().mean())
        estimate = self._accumulated + self._rate * change / self._out_norm
        if estimate < self.cache.limit:
            self._accumulated = estimate
            return True
        return False

    def _calibrated(self, i: int) -> bool:
        ratio = self._ratio * self.cache.calibration.ratios[i]
        error = self._accumulated + abs(1.0 - ratio)
        if error < self.cache.limit:
            self._ratio, self._accumulated = ratio, error
            return True
        return False
