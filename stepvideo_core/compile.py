"""``torch.compile`` of the DiT's transformer blocks (not of the whole model), for one run at a time.

Usage::

    settings = CompileSettings.parse("blocks")             # or CompileSettings(mode="blocks", ...)
    with compiled_blocks(model, settings, device=device) as compiled:
        latents = sample(model, ..., settings=...)         # BlockStreamer, LoRA, fp8 as usual
    print(compiled.summary())

How it is put together, and why:

* **One code object for all blocks.**  The 48 blocks are identical modules, so one function that takes
  the block as its first argument (:func:`_block_forward`) is compiled once; torch's dynamo lifts the
  block's parameters and buffers as graph *inputs* (it does not bake them in and guards on their
  shape, dtype and device, not on which block they belong to), so every block, every step and the
  next run reuse the same graph.  Each block's own ``forward`` is pointed at that compiled function
  for the run (an instance attribute, removed afterwards), so the model code is untouched and the
  block's own hooks still run *outside* the graph.
* **Block streaming** (:class:`~stepvideo_core.offload.streamer.BlockStreamer`) swaps a streamed
  block's tensors in and out from those block hooks by replacing ``param.data`` (parameters keep
  their identity).  The graph reads the parameters at every call, so it always computes with the
  tensors the streamer just swapped in; no recompile per block or per step, no stale weights.
  Inductor's ``freezing`` (which would fold the weights into the graph) and CUDA graphs (which would
  pin their addresses) are switched off while a run is compiled.  On the CPU test transport
  ("copy") the streamed blocks' slots are inference-mode tensors and the resident ones are not,
  which is one more graph, once.
* **On-the-fly LoRA** (:mod:`stepvideo_core.lora.apply`) adds forward hooks to the blocks' Linear
  layers: those are *inside* the compiled region, so they are traced into the graph, and hook guards
  are switched on for the run (``skip_nnmodule_hook_guards = False``): attaching or detaching an
  adapter recompiles instead of reusing a graph without (or with a stale) adapter.  A strength is a
  constant of the graph on torch 2.13 (another strength compiles once more) and an input on torch 2.9.
  The hooks must not key anything on object identity (``id()``): that would be one graph per block.
* **fp8-scaled layers** (:class:`~stepvideo_core.fp8.ScaledFp8Linear`) trace as they are: the per-row
  activation quantisation and ``torch._scaled_mm`` (or the dequantise fallback) end up in the graph.
* **Attention**: the backend reaches the graph resolved (the model's own resolution, or ``"auto"``
  resolved here once per device and dtype); SDPA is traced,
  SageAttention and flash-attn (CUDA only) are called eagerly from the graph (graph breaks, see
  :mod:`stepvideo_core.attention`).
* **The first call of each block in a run is eager**: it fills whatever the layers fill lazily (LoRA
  adapters copied to the device, the fp8 kernel probe), so the graph never traces a first-use path.
* **Shapes**: static by default (``dynamic=False``: one graph per video size and batch) except the
  text length, which changes with every prompt and is marked dynamic (``dynamic_text``), so a new
  prompt does not recompile.  ``recompile_limit`` caps the graphs dynamo keeps for the block
  function (``torch._dynamo.config.recompile_limit``, ``cache_size_limit`` on older torch), set for
  the run and restored afterwards; past it dynamo runs new shapes eagerly.
* **Failure** never stops a run: when compiling (or a compiled call) fails and the same block runs
  eagerly, the run goes on eagerly with one warning that names the cause and the fix (no Triton, no
  C++ compiler, fp8 kernels the GPU lacks, a Python torch.compile does not support); later runs with
  the same settings go straight to eager.  When the eager call fails too, its error is raised: the
  problem was not the compiler.

Nothing here imports ComfyUI.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import platform
import threading
import time
import types
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

log = logging.getLogger("StepVideo")

MODES = ("off", "blocks")
DEFAULT_BACKEND = "inductor"
DEFAULT_RECOMPILE_LIMIT = 16
_LIMIT_NAMES = ("recompile_limit", "cache_size_limit")   # the newer name first
_TEXT_ARGS = (("context", 1), ("mask", 3))                # block arguments whose axis is the text length
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
OFF_HINT = "set compile to off (node input) or drop --compile (CLI) to silence this"


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """How :func:`compiled_blocks` compiles the transformer blocks.

    * ``mode``: "off" (eager, the default) or "blocks" (each transformer block through one compiled function).
    * ``backend``: a ``torch.compile`` backend name (default "inductor") or a backend callable (tests).
    * ``dynamic``: ``torch.compile``'s ``dynamic`` (False: static shapes, one graph per video size).
    * ``dynamic_text``: mark the text length (context and mask) dynamic, so that prompts of other
      lengths reuse the graph (with ``dynamic`` False the only symbolic size).
    * ``recompile_limit``: graphs dynamo may keep for the block function (set for the run, restored after).
    * ``fullgraph``: require one graph per block (fails -- and falls back to eager -- on a graph break).
    """

    mode: str = "off"
    backend: Union[str, Callable] = DEFAULT_BACKEND
    dynamic: bool = False
    dynamic_text: bool = True
    recompile_limit: int = DEFAULT_RECOMPILE_LIMIT
    fullgraph: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown compile mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not (isinstance(self.backend, str) and self.backend) and not callable(self.backend):
            raise ValueError(f"compile backend must be a torch.compile backend name or callable, got {self.backend!r}")
        if isinstance(self.recompile_limit, bool) or not isinstance(self.recompile_limit, int) \
                or self.recompile_limit < 1:
            raise ValueError(f"recompile_limit must be a positive integer, got {self.recompile_limit!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @classmethod
    def parse(cls, value: Union[None, bool, str, "CompileSettings"]) -> "CompileSettings":
        """Settings from what a node, the CLI or the pipeline is given: None/False/"off", True/"blocks", or settings."""
        if isinstance(value, CompileSettings):
            return value
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(mode="blocks")
        if isinstance(value, str):
            return cls(mode=value.strip().lower())
        raise ValueError(f"compile must be one of {', '.join(MODES)}, got {value!r}")

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        backend = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        shapes = "dynamic shapes" if self.dynamic else ("static shapes, dynamic text length" if self.dynamic_text
                                                        else "static shapes")
        return f"{self.mode} ({backend}, {shapes}, recompile limit {self.recompile_limit})"


def _block_forward(block: nn.Module, *args, **kwargs):
    """The function that is compiled: one block's own forward (its class's), the block as an argument."""
    return type(block).forward(block, *args, **kwargs)


class _Compiled:
    """One compiled block function per (backend, dynamic, dynamic_text, fullgraph), kept for the process.

    It has a code object of its own, so its graphs, and the recompile limit, belong to these
    settings alone; ``graphs`` counts the graphs compiled for it over the process's lifetime and
    ``failure`` says why it was given up (then every later run is eager).
    """

    def __init__(self, settings: CompileSettings, index: int):
        base = _block_forward
        code = base.__code__.replace(co_name=f"stepvideo_block_{index}",
                                     **({"co_qualname": f"stepvideo_block_{index}"}
                                        if hasattr(base.__code__, "co_qualname") else {}))
        self.function = types.FunctionType(code, base.__globals__, code.co_name)
        self.settings = settings
        self.graphs = 0
        self.compile_seconds = 0.0
        self.failure: Optional[str] = None
        self.warned_limit = False
        self._callable = None

    def callable(self):
        if self._callable is None:
            s = self.settings
            self._callable = torch.compile(self.function, backend=s.backend, dynamic=s.dynamic, fullgraph=s.fullgraph)
        return self._callable


_REGISTRY: dict = {}
_LOCK = threading.Lock()


def _compiled_for(settings: CompileSettings) -> _Compiled:
    key = (settings.backend, settings.dynamic, settings.dynamic_text, settings.fullgraph)
    with _LOCK:
        found = _REGISTRY.get(key)
        if found is None:
            found = _REGISTRY[key] = _Compiled(settings, len(_REGISTRY))
        return found


def forget_compiled() -> None:
    """Drop every compiled block function of this module and torch's compiled code (``torch._dynamo.reset``).

    Exists for tests and benchmarks that must compile from scratch; a run never needs it.
    """
    with _LOCK:
        _REGISTRY.clear()
    torch._dynamo.reset()


def _graphs_compiled() -> int:
    """Graphs dynamo has handed to a backend in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def diagnose(exc: BaseException, device: Optional[torch.device] = None) -> tuple[str, str]:
    """(cause, fix) for a compile failure, in words, for the one warning a failed compile gives.

    The cause is the exception's first line; the fix is chosen from it (and from the exception's
    chain: inductor wraps a compiler's error in BackendCompilerFailed).
    """
    chain = _chain(exc)
    lines = [f"{type(e).__name__}: {e}".strip().splitlines()[0] for e in chain]
    first = lines[-1] if len(chain) == 1 else f"{type(exc).__name__} from {lines[-1]}"  # the root cause
    cause = first if len(first) <= 300 else first[:297] + "..."
    low = " | ".join(lines).lower()
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if "triton" in low:
        fix = ("install Triton, which inductor needs on a GPU (Linux: pip install triton; Windows: pip install "
               "triton-windows), or " + OFF_HINT)
    elif any(word in low for word in ("cppcompileerror", "invalidcxxcompiler", "c++ compiler", "cl.exe", "g++",
                                      "gcc", "compiler not found", "no such file or directory: 'c++'")):
        fix = ("install a C++ compiler, which inductor needs on the CPU (Linux: gcc/g++; macOS: Xcode command "
               "line tools; Windows: Visual Studio Build Tools with 'Desktop development with C++'), or " + OFF_HINT)
    elif on_cuda and any(word in low for word in ("float8", "fp8", "_scaled_mm", "e4m3", "sm_8", "capability")):
        fix = ("this GPU or torch build has no compiled kernel for the fp8 weights: load the model with "
               "weight_dtype default/bf16 (--weights full) to compile, or " + OFF_HINT)
    elif "python" in low and "not supported" in low:
        fix = "use a torch whose torch.compile supports this Python (a newer torch), or " + OFF_HINT
    else:
        fix = ("see the traceback logged at debug level (logger 'StepVideo'); "
               + ("check that Triton works there (python -c 'import triton'); " if on_cuda else "") + OFF_HINT)
    return cause, fix


def _chain(exc: BaseException) -> list:
    """``exc`` and the exceptions it wraps (``__cause__`` / ``__context__``), at most 8, outermost first."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen and len(out) < 8:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _precheck(settings: CompileSettings, device: Optional[torch.device]) -> Optional[BaseException]:
    """A reason compiling cannot work here, found before any block runs (None: try it)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return RuntimeError(f"torch.compile is not supported on this Python ({platform.python_version()}) "
                                f"with torch {torch.__version__}")
    except Exception as exc:  # noqa: BLE001 - whatever the reason, compiling is off
        return exc
    if device is not None and torch.device(device).type == "cuda" and settings.backend == "inductor":
        try:
            from torch.utils._triton import has_triton
            if not has_triton():
                return RuntimeError("inductor needs Triton on CUDA and no working triton installation was found")
        except Exception:  # noqa: BLE001 - the probe itself moved or failed: let the compile tell
            pass
    return None


class CompiledBlocks:
    """The transformer blocks of ``model`` running through one compiled function, for one run.

    A context manager (see :func:`compiled_blocks`); with ``mode`` "off" it does nothing.  After the
    run: ``graphs`` (graphs compiled during this run), ``compile_seconds`` (time of the calls that
    compiled), ``compiled_calls`` / ``eager_calls`` (block calls each way, the first call of every
    block being eager), ``fallback`` (why the run went eager, or None) and :meth:`summary`.
    """

    def __init__(self, model: nn.Module, settings: Union[None, str, bool, CompileSettings] = None,
                 device: Union[None, str, torch.device] = None):
        self.model = model
        self.settings = CompileSettings.parse(settings)
        self.device = None if device is None else torch.device(device)
        self.graphs = 0
        self.compile_seconds = 0.0
        self.compiled_calls = 0
        self.eager_calls = 0
        self.fallback: Optional[str] = None
        self._compiled: Optional[_Compiled] = None
        self._installed: list[nn.Module] = []
        self._warm: set = set()
        self._saved_config: list = []
        self._backends: dict = {}
        self._active = False

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "CompiledBlocks":
        if not self.settings.enabled:
            return self
        compiled = self._compiled = _compiled_for(self.settings)
        if compiled.failure is not None:
            self.fallback = compiled.failure
            log.info("StepVideo: compile %s is off for this process: it failed before (%s)",
                     self.settings.mode, compiled.failure)
            return self
        problem = _precheck(self.settings, self.device)
        if problem is not None:
            self._give_up(problem)
            return self
        blocks = list(getattr(self.model, "transformer_blocks", ()))
        if not blocks:
            raise ValueError("compile 'blocks' needs a model with transformer_blocks (a Step-Video DiT)")
        if any("forward" in vars(block) for block in blocks):
            raise RuntimeError("the transformer blocks already have a forward override (compiled blocks entered "
                               "twice on one model?); leave the other run first")
        names = list(inspect.signature(type(blocks[0]).forward).parameters)[1:]
        self._text_positions = {name: (names.index(name), axis) for name, axis in _TEXT_ARGS if name in names}
        self._backend_position = names.index("backend") if "backend" in names else None
        try:
            self._patch_config()
            for block in blocks:
                block.forward = _BlockCall(self, block)
                self._installed.append(block)
        except BaseException:
            self._remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        if self.settings.enabled and (self.compiled_calls or self.fallback):
            log.info("StepVideo: %s", self.summary())

    def _remove(self) -> None:
        for block in self._installed:
            vars(block).pop("forward", None)
        self._installed = []
        self._restore_config()
        self._warm = set()
        self._active = False

    # -- torch configuration for the run ------------------------------------------------
    def _patch_config(self) -> None:
        """Recompile limit, hook guards on, no weight freezing or CUDA graphs: set now, restored in _remove."""
        import torch._dynamo.config as dynamo_config

        changes = [(dynamo_config, next(n for n in _LIMIT_NAMES if hasattr(dynamo_config, n)),
                    self.settings.recompile_limit)]
        if hasattr(dynamo_config, "skip_nnmodule_hook_guards"):
            changes.append((dynamo_config, "skip_nnmodule_hook_guards", False))
        if self.settings.backend == "inductor":
            import torch._inductor.config as inductor_config

            changes.append((inductor_config, "freezing", False))
            changes.append((inductor_config.triton, "cudagraphs", False))
        for owner, name, value in changes:
            self._saved_config.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)

    def _restore_config(self) -> None:
        for owner, name, value in reversed(self._saved_config):
            setattr(owner, name, value)
        self._saved_config = []

    # -- calls ---------------------------------------------------------------------------
    def _resolved(self, backend: Any, x: torch.Tensor) -> Any:
        """"auto" as the concrete backend an unmasked call would pick (masked calls take SDPA either way).

        A backend the model resolved itself (an :class:`~stepvideo_core.attention.Resolved`, which
        compares equal to "auto") is passed on as it is: the graph then skips the resolution.
        """
        if backend != "auto" or hasattr(backend, "kernel"):
            return backend
        key = (x.device, x.dtype)
        found = self._backends.get(key)
        if found is None:
            from .attention import resolve_backend

            found = self._backends[key] = resolve_backend("auto", x.device, x.dtype, masked=False)
        return found

    def call(self, block: nn.Module, args: tuple, kwargs: dict):
        """Run ``block`` on ``args``: eager on its first call and after a failure, else compiled."""
        eager = type(block).forward
        compiled = self._compiled
        if not self._active or compiled is None or compiled.failure is not None or id(block) not in self._warm:
            self._warm.add(id(block))
            self.eager_calls += 1
            return eager(block, *args, **kwargs)
        args = list(args)
        position = self._backend_position
        if args and isinstance(args[0], torch.Tensor) and position is not None:
            if position < len(args):
                args[position] = self._resolved(args[position], args[0])
            elif "backend" in kwargs:
                kwargs = dict(kwargs, backend=self._resolved(kwargs["backend"], args[0]))
        if self.settings.dynamic_text and not self.settings.dynamic:
            kwargs = dict(kwargs)
            self._mark_text_dynamic(args, kwargs)
        before = _graphs_compiled()
        start = time.perf_counter()
        try:
            out = compiled.callable()(block, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; the eager call below decides
            if isinstance(exc, _OUT_OF_MEMORY):
                raise
            out = eager(block, *args, **kwargs)   # raises when the problem is not the compiler
            self._give_up(exc)
            self.eager_calls += 1
            return out
        new = _graphs_compiled() - before
        if new:
            seconds = time.perf_counter() - start
            self.graphs += new
            self.compile_seconds += seconds
            compiled.graphs += new
            compiled.compile_seconds += seconds
            if compiled.graphs >= self.settings.recompile_limit and not compiled.warned_limit:
                compiled.warned_limit = True
                log.warning("StepVideo: %d graphs compiled for the transformer blocks, the recompile limit (%d): "
                            "further video sizes, batches or LoRA strengths run eagerly. Raise recompile_limit "
                            "or restart to compile afresh.", compiled.graphs, self.settings.recompile_limit)
        self.compiled_calls += 1
        return out

    def _mark_text_dynamic(self, args: list, kwargs: dict) -> None:
        """Mark the text axis of the context and the mask dynamic (in place in ``args`` / ``kwargs``).

        A context cut to the longest prompt is a strided view of the padded one, an uncut one is
        contiguous: both are made contiguous so that one graph serves both (the copy is one
        [B, S, D] tensor per block call).
        """
        for name, (position, axis) in self._text_positions.items():
            positional = position < len(args)
            tensor = args[position] if positional else kwargs.get(name)
            if isinstance(tensor, torch.Tensor) and tensor.ndim > axis and tensor.shape[axis] >= 2:
                tensor = tensor.contiguous()
                torch._dynamo.maybe_mark_dynamic(tensor, axis)  # specialised, not an error, where code needs it
                if positional:
                    args[position] = tensor
                else:
                    kwargs[name] = tensor

    def _give_up(self, exc: BaseException) -> None:
        """Turn compiling off for these settings with one warning naming the cause and the fix."""
        cause, fix = diagnose(exc, self.device)
        self.fallback = cause
        if self._compiled is not None:
            first = self._compiled.failure is None
            self._compiled.failure = cause
        else:
            first = True
        log.debug("StepVideo: compile failure", exc_info=exc)
        if first:
            log.warning("StepVideo: compile '%s' of the transformer blocks failed, so they run eagerly instead "
                        "(same results, not faster). Cause: %s. Fix: %s.", self.settings.mode, cause, fix)

    def summary(self) -> str:
        """One line: what was compiled, how many graphs, the compile time, the calls each way."""
        if not self.settings.enabled:
            return "compile off"
        if self.fallback is not None and not self.compiled_calls:
            return f"compile {self.settings.mode}: eager (compile failed: {self.fallback})"
        total = self._compiled.graphs if self._compiled is not None else self.graphs
        text = (f"compiled blocks: {self.graphs} graph{'s' if self.graphs != 1 else ''} compiled this run "
                f"({total} in all) in {self.compile_seconds:.1f} s; {self.compiled_calls} compiled and "
                f"{self.eager_calls} eager block calls")
        if self.fallback is not None:
            text += f"; then eager (compile failed: {self.fallback})"
        return text


class _BlockCall:
    """A block's ``forward`` for one run: hands the call to :meth:`CompiledBlocks.call` (outside the graph)."""

    __slots__ = ("owner", "block")

    def __init__(self, owner: CompiledBlocks, block: nn.Module):
        self.owner, self.block = owner, block

    def __call__(self, *args, **kwargs):
        return self.owner.call(self.block, args, kwargs)


def compiled_blocks(model: nn.Module, settings: Union[None, str, bool, CompileSettings] = None,
                    device: Union[None, str, torch.device] = None) -> CompiledBlocks:
    """Context manager: ``model``'s transformer blocks run compiled inside it (see the module docstring).

    ``settings``: :class:`CompileSettings`, or "off"/"blocks" (None = off: does nothing).  ``device``:
    where the blocks compute, for the checks made before compiling (e.g. Triton on CUDA).  Enter it
    inside the LoRA attachment and outside the :class:`~stepvideo_core.offload.BlockStreamer`, around
    the whole run; the compiled code is kept for the process, so the next run does not compile again.
    """
    return CompiledBlocks(model, settings, device)
