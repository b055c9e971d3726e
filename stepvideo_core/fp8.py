"""Scaled fp8 weights: ``float8_e4m3fn`` storage with one fp32 scale per output channel.

A weight W [out, in] is stored as ``W8 = round_e4m3(W / s)`` with
``s[o] = max|W[o, :]| / 448`` (448 = largest e4m3 value), so every row uses the
whole fp8 range.  Only the transformer blocks' Linear layers are stored this way
(96% of the 30B parameters); norms, biases, embeddings, modulation tables, the
caption/timestep projections and the final projection stay in the compute dtype.

Two ways to multiply (chosen per call, see :func:`fp8_matmul_supported`):

* **matmul**: ``torch._scaled_mm`` with the input quantised per row (token) on the
  fly -- dynamic scales ``max|x[r, :]| / 448``, never a unit scale -- and the
  weight's per-channel scales; fp32 accumulation, output in the compute dtype.
  Used on CUDA with compute capability >= 8.9 (Ada/Hopper) for bf16 inputs, and on
  the CPU (torch implements it there too, which is how the tests exercise it).
* **dequantise**: ``W8 * s`` in the compute dtype, then an ordinary matmul.
  Everywhere else, and whenever the kernel refuses a shape.

File format (what :mod:`stepvideo_core.convert` writes and what ComfyUI users share as
"fp8_scaled"): the usual tensor names, quantised weights in ``F8_E4M3`` plus a
``<layer>.scale_weight`` tensor next to each -- shape [out, 1] or [out] (per channel)
or [] / [1] (one scale for the whole tensor, the common ComfyUI variant) -- and an
empty marker tensor named ``scaled_fp8``.  ``scale_input`` tensors (static input
scales) are ignored: inputs always get dynamic per-row scales.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import ops
from .checkpoint import CheckpointError
from .checks import count_non_finite

log = logging.getLogger("StepVideo")

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MARKER_KEY = "scaled_fp8"
SCALE_SUFFIX = ".scale_weight"
IGNORED_SUFFIXES = (".scale_input",)
_MIN_SCALE = 1e-12          # rows of zeros get this scale (their fp8 values are 0 anyway)
_CHUNK_ELEMENTS = 1 << 24   # CPU: fp32 temporaries while quantising are at most 64 MB each
MATMUL_MODES = ("auto", "matmul", "dequantize")


def _row_chunks(rows: int, cols: int):
    """Row ranges whose fp32 copies stay under :data:`_CHUNK_ELEMENTS` elements (the CPU path)."""
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 copy of 2-D ``x``, fp32 scales [rows, 1]) with one scale per row: ``x ~ x8 * scale``.

    Used for weights (rows = output channels) and for activations (rows = tokens).  The values are
    ``(x.float() / s).clamp(-448, 448).to(fp8)`` with ``s = max(max|x[r]| / 448, 1e-12)``; the clamp
    never changes a value (``|x / s|`` rounds to at most 448) and is not run.  Off the CPU, and in a
    compiled graph, one pass of two kernels (:func:`_quantize_in_one_pass`); on the CPU, whose kernels
    compute mixed dtypes through fp32 temporaries anyway, in row chunks of in-place fp32 operations
    (:func:`_quantize_in_chunks`).
    Both give the same bits (tests/core/test_fp8_fused.py).
    """
    if x.ndim != 2:
        raise ValueError(f"quantize_rows expects a 2-D tensor, got shape {list(x.shape)}")
    x = x.detach()  # out= writes below; a quantised copy has no gradient anyway
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        _quantize_in_chunks(x, out, scales)
    else:  # also inside a torch.compile graph (stepvideo_core.compile), which fuses it and cannot take the chunks
        _quantize_in_one_pass(x, out, scales)
    return out, scales


def _quantize_in_one_pass(x: torch.Tensor, out: torch.Tensor, scales: torch.Tensor) -> None:
    """Quantise all rows of ``x`` into ``out`` / ``scales`` with two kernels and no temporary the size of x.

    The rows' largest magnitudes (``vector_norm(ord=inf)`` accumulated in fp32: exact, NaN kept, no
    ``abs`` copy), then one division by the row scales computed in fp32 and rounded to e4m3 on store
    (GPU kernels convert in registers; the tiny scale arithmetic in between is on [rows, 1]).
    """
    peak = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    torch.div(peak, FP8_MAX, out=scales).clamp_min_(_MIN_SCALE)
    torch.div(x, scales, out=out)


def _quantize_in_chunks(x: torch.Tensor, out: torch.Tensor, scales: torch.Tensor) -> None:
    """The CPU path: per row chunk, the peaks in x's own dtype (exact), then an fp32 copy divided in place.

    Bounded fp32 temporaries (:data:`_CHUNK_ELEMENTS`), and the CPU's fastest sequence: its
    mixed-dtype division and ``vector_norm`` would make fp32 copies of their own.
    """
    for start, stop in _row_chunks(*x.shape):
        part = x[start:stop]
        scale = (part.abs().amax(dim=1, keepdim=True).to(torch.float32) / FP8_MAX).clamp_min(_MIN_SCALE)
        out[start:stop] = part.to(torch.float32, copy=True).div_(scale)
        scales[start:stop] = scale
        del part, scale


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight [out, in], fp32 per-output-channel scales [out]) for a Linear weight."""
    w8, scale = quantize_rows(weight)
    return w8, scale.reshape(-1)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` in ``dtype``: the full-precision weight an fp8 weight stands for.

    The cast and then the scaling in place: one full-size tensor is made, not two (same values:
    the product of the cast weight and the scale cast to ``dtype``, rounded once).
    """
    return weight.to(dtype).mul_(scale.reshape(-1, 1).to(dtype))


def normalize_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """A file's ``scale_weight`` ([], [1], [out] or [out, 1]) as fp32 [out]."""
    flat = scale.reshape(-1).float()
    if flat.numel() == 1:
        return flat.expand(out_features).clone()
    if flat.numel() != out_features:
        raise ValueError(f"scale_weight has {flat.numel()} values for a layer with {out_features} output channels")
    return flat.contiguous()


_FP8_MATMUL_PROBED: dict = {}


def _key(device: torch.device) -> tuple:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device.type, device.index


def fp8_matmul_supported(device: torch.device) -> bool:
    """True when ``torch._scaled_mm`` with row-wise scales runs on ``device`` (cached per device).

    CUDA needs compute capability >= 8.9 (fp8 tensor cores); there, and on the CPU, a
    tiny row-wise call is tried once, because kernel coverage varies between torch
    builds and GPUs.  Other devices use the dequantise path.
    """
    key = _key(device)
    if key in _FP8_MATMUL_PROBED:
        return _FP8_MATMUL_PROBED[key]
    ok = hasattr(torch, "_scaled_mm") and key[0] in ("cpu", "cuda")
    if ok and key[0] == "cuda":
        ok = torch.cuda.get_device_capability(torch.device(*key)) >= (8, 9)
    if ok:
        dev = torch.device(*key) if key[1] is not None else torch.device(key[0])
        try:
            a = torch.ones(16, 16, device=dev).to(FP8)
            one = torch.ones(16, 1, device=dev)
            out = torch.bfloat16 if key[0] == "cuda" else torch.float32
            torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t(), out_dtype=out)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            log.info("StepVideo: fp8 matmul unavailable on %s (%s); fp8 weights are dequantised", dev, exc)
            ok = False
    _FP8_MATMUL_PROBED[key] = ok
    return ok


class ScaledFp8Linear(ops.Linear):
    """A Linear that holds either an ordinary weight or a scaled fp8 one (``scale_weight`` buffer).

    Which one is decided at load time: the loader sets ``quantize_on_load`` on the
    layers it wants in fp8 (then a full-precision weight is quantised as it
    arrives), and a weight that arrives already in fp8 is kept as is.
    ``matmul_mode`` ("auto", "matmul", "dequantize") picks the multiplication.
    """

    quantize_on_load = False
    matmul_mode = "auto"

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8

    # -- loading -----------------------------------------------------------------------
    def expect_scale(self, shape: tuple) -> None:
        """Declare a ``scale_weight`` of the file's ``shape`` so strict key checks expect it."""
        self.register_buffer("scale_weight", torch.empty(shape, device="meta", dtype=torch.float32))

    def take_tensor(self, leaf: str, tensor: torch.Tensor, device: torch.device) -> bool:
        """Load hook: store ``tensor`` as this layer's ``leaf`` ("weight"/"scale_weight") in fp8 form.

        Returns True when this layer stored it, False to let the generic loader handle it
        (biases; full-precision weights of a layer not marked ``quantize_on_load``).  No dtype
        is taken: a weight is kept in fp8 and a scale in float32 whatever the model's dtype.
        """
        if leaf == "scale_weight":
            self.register_buffer("scale_weight", normalize_scale(tensor, self.out_features).to(device))
            return True
        if leaf != "weight":
            return False
        if tensor.dtype == FP8:
            w8 = tensor
            if "scale_weight" not in self._buffers:  # plain fp8 file without scales: unit weight scale
                self.register_buffer("scale_weight", torch.ones(self.out_features, device=device))
        elif self.quantize_on_load:
            w8, scale = quantize_weight(tensor)
            self.register_buffer("scale_weight", scale.to(device))
        else:
            return False
        self.weight = torch.nn.Parameter(w8.to(device), requires_grad=False)
        return True

    def dequantize_(self, dtype: torch.dtype) -> None:
        """Turn this layer back into an ordinary ``dtype`` Linear (drops ``scale_weight``)."""
        if self.is_fp8:
            weight = dequantize_weight(self.weight, self.scale_weight, dtype)
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            del self._buffers["scale_weight"]

    # -- compute -----------------------------------------------------------------------
    def _use_matmul(self, x: torch.Tensor) -> bool:
        if self.matmul_mode == "dequantize":
            return False
        shapes_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0
        dtype_ok = x.device.type == "cpu" or x.dtype == torch.bfloat16
        usable = shapes_ok and dtype_ok and fp8_matmul_supported(x.device)
        if self.matmul_mode == "matmul" and not usable:
            raise RuntimeError(f"fp8 matmul cannot run for a {self.in_features}->{self.out_features} layer on "
                               f"{x.device} with {x.dtype} inputs; use matmul_mode 'auto' or 'dequantize'")
        return usable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_fp8:
            return super().forward(x)
        return self.fp8_linear(x, self.weight, self.scale_weight, self.bias)

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
        """This layer's fp8 product with explicit tensors: ``weight`` fp8 [out, in], ``scale`` fp32 [out].

        :meth:`forward` passes the layer's own; a caller that fetched copies first (e.g. onto the
        compute device, as ComfyUI's partial loading does) gets exactly the same arithmetic.
        """
        y = None
        if self._use_matmul(x):
            x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
            try:
                y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale,
                                     scale_b=scale.reshape(1, -1), out_dtype=x.dtype)
            except RuntimeError as exc:  # a shape or layout this build's kernel refuses
                if self.matmul_mode == "matmul":
                    raise
                log.warning("StepVideo: fp8 matmul failed on %s (%s); dequantising fp8 weights from now on",
                            x.device, exc)
                _FP8_MATMUL_PROBED[_key(x.device)] = False
            del x8, x_scale
            if y is not None:
                y = y.reshape(*x.shape[:-1], self.out_features)
        if y is None:
            y = F.linear(x, dequantize_weight(weight, scale, x.dtype))
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y


class scaled_fp8(ops.plain):  # noqa: N801 - an op family, like ops.plain
    """Op family whose Linear layers can hold scaled fp8 weights (everything else as ``ops.plain``)."""

    Linear = ScaledFp8Linear


def fp8_layers(model: torch.nn.Module, prefix: str = "") -> dict[str, ScaledFp8Linear]:
    """Qualified name -> layer, for every :class:`ScaledFp8Linear` under ``prefix``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, ScaledFp8Linear) and name.startswith(prefix)}


def is_scaled_fp8_file(dtypes: dict) -> bool:
    """True when a checkpoint (tensor name -> safetensors dtype string) holds fp8 weights."""
    return MARKER_KEY in dtypes or any(d.startswith("F8_") for k, d in dtypes.items() if k.endswith(".weight"))


def prepare_for_scaled_file(model: torch.nn.Module, shapes: dict) -> list[str]:
    """Declare the ``scale_weight`` tensors a pre-quantised file holds; returns the names to skip.

    Skipped names are the marker and ``scale_input`` tensors (unused).  Raises
    ValueError when a scale belongs to something that is not an fp8-capable Linear.
    """
    skip = []
    for name, shape in shapes.items():
        if name == MARKER_KEY or name.endswith(IGNORED_SUFFIXES):
            skip.append(name)
        elif name.endswith(SCALE_SUFFIX):
            owner_name = name[:-len(SCALE_SUFFIX)]
            try:
                owner = model.get_submodule(owner_name)
            except AttributeError:
                continue  # left for the strict key check to report
            if not isinstance(owner, ScaledFp8Linear):
                raise ValueError(f"{name}: fp8 scales are supported for Linear layers only, "
                                 f"{owner_name} is a {type(owner).__name__}")
            owner.expect_scale(tuple(shape))
    return skip


def check_scales(scale: torch.Tensor, name: str) -> None:
    """Raise CheckpointError unless every value of the file's fp8 scale tensor ``name`` is finite and positive.

    Exists because a NaN, zero or negative scale silently multiplies a whole layer into
    NaN or zeros: the run would "succeed" with a black video.  Scales are one value per
    output channel (or per tensor), so checking them at load costs nothing.
    """
    values = scale.detach().float()
    non_finite = count_non_finite(values)
    not_positive = int((values[torch.isfinite(values)] <= 0).sum())  # -inf counts as non-finite only
    if not (non_finite or not_positive):
        return
    found = [f"{n} of {values.numel()} values are {what}" for n, what in
             ((non_finite, "NaN/Inf"), (not_positive, "zero or negative")) if n]
    raise CheckpointError(f"{name}: fp8 scales must be finite and positive, but {' and '.join(found)}. The file is "
                          f"damaged or was written by a broken fp8 converter: download it again, or convert the "
                          f"full-precision weights again (python -m stepvideo_core.convert).")


def make_take_hook(model: torch.nn.Module, device, source: str = "") -> Callable[[str, torch.Tensor], bool]:
    """The ``take`` hook for :func:`stepvideo_core.checkpoint.load_weights`: fp8-capable layers take
    their weights and scales themselves (quantising when marked), everything else loads normally.

    Every ``scale_weight`` read from the file is checked first (:func:`check_scales`); its
    error names ``source`` (the checkpoint, for messages) and the key.
    """
    device = torch.device(device)
    where = f"{source}: " if source else ""

    def take(name: str, tensor: torch.Tensor) -> bool:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(owner, ScaledFp8Linear):
            if leaf == "scale_weight":
                check_scales(tensor, where + name)
            return owner.take_tensor(leaf, tensor, device)
        return False
    return take


def set_matmul_mode(model: torch.nn.Module, mode: str) -> None:
    """Set ``matmul_mode`` ("auto", "matmul", "dequantize") on every fp8-capable layer of ``model``."""
    if mode not in MATMUL_MODES:
        raise ValueError(f"unknown fp8 matmul mode {mode!r}; expected one of {MATMUL_MODES}")
    for layer in fp8_layers(model).values():
        layer.matmul_mode = mode


def dequantize_model(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Turn every fp8 layer of ``model`` into an ordinary ``dtype`` Linear; returns how many were fp8."""
    count = 0
    for layer in fp8_layers(model).values():
        if layer.is_fp8:
            layer.dequantize_(dtype)
            count += 1
    return count


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (fp8 weights count one byte each)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
