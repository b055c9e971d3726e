"""Block streaming ("block swap"): run the DiT on a device too small to hold it.

:class:`BlockStreamer` is a context manager around a sampling run.  On entry it
copies the non-block weights and the first ``blocks_on_device`` transformer
blocks to the compute device and allocates the device slots of the streamed
blocks; while the model runs it executes the schedule of
:mod:`stepvideo_core.offload.schedule` from forward hooks on each block (the
model code is untouched); on exit -- normal, error or interrupt -- every tensor
points at its home (host) copy again and the device copies are dropped.

Transports (``mode``):

``"cuda"``  host copies of streamed blocks are pinned once (kept pinned on the
            model, so repeated runs allocate no new host memory), copies run
            on a separate CUDA stream, ordered by events: a slot is refilled
            only after the block that used it finished, a block computes only
            after its copy landed.
``"copy"``  the same slots, filled by ordinary synchronous copies (any device;
            used on CPU by the tests to exercise the slot logic for real).
``"none"``  compute device == home device: the schedule runs, nothing is copied.
``"auto"``  "cuda" on CUDA devices, "none" when the weights already live on the
            compute device, "copy" otherwise.

Every CUDA call of the "cuda" transport goes through one :class:`TorchCuda` object
(streams, events, the current stream, the non-blocking copy, pinning, device allocations); the
streamer takes another one as ``cuda_api`` so tests can record the order of those calls on a
machine without a GPU (tests/core/offload/test_streamer_cuda_order.py, test_kept_weights.py).

Resident tensors: with the "cuda" transport they are uploaded on the copy stream, from pinned
memory (pinned once, like the streamed blocks, after them so that a pinned-memory budget goes
to the blocks copied at every step first), and the compute stream waits for them; "copy"
uploads with ordinary copies.  Given ``kept`` (a :class:`~stepvideo_core.offload.kept.KeptWeights`)
the streamer reuses the device copies it holds and leaves the ones it uploads there, so the
next run moves no resident weight (kept uploads read the home tensors as they are: one upload
per eviction does not repay pinning them).  ``uploaded`` / ``reused`` name the resident tensors
of a run either way.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import torch
from torch import nn

from .kept import KeptWeights
from .schedule import Action, initial_state, plan_pass, split_blocks

log = logging.getLogger("StepVideo")


class SamplingInterrupted(Exception):
    """``should_stop()`` answered True; raised between blocks or steps after weights are back home."""


def _tensor_slots(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) of every parameter and buffer of ``module``, in a stable order."""
    out = []
    for owner in module.modules():
        out += [(owner, name, True) for name, p in owner._parameters.items() if p is not None]
        out += [(owner, name, False) for name, b in owner._buffers.items() if b is not None]
    return out


def _get(owner: nn.Module, name: str, is_param: bool) -> torch.Tensor:
    return owner._parameters[name].data if is_param else owner._buffers[name]


def _set(owner: nn.Module, name: str, is_param: bool, tensor: torch.Tensor) -> None:
    """Point parameter/buffer ``name`` at ``tensor`` (parameters keep their identity)."""
    if is_param:
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor


def pin_in_place(module: nn.Module, pin: Optional[Callable] = None, is_pinned: Optional[Callable] = None) -> int:
    """Replace every CPU tensor of ``module`` that is not pinned yet by a pinned copy; returns how many.

    Pinning happens once per tensor: the pinned copy *becomes* the home tensor, so later
    runs find it pinned and allocate nothing (host RAM does not grow run after run).
    Tensor by tensor, so the peak is one extra tensor.  ``pin`` / ``is_pinned`` exist for tests.
    """
    pin = pin or (lambda t: t.pin_memory())
    is_pinned = is_pinned or (lambda t: t.is_pinned())
    count = 0
    for owner, name, is_param in _tensor_slots(module):
        tensor = _get(owner, name, is_param)
        if tensor.device.type == "cpu" and not is_pinned(tensor):
            _set(owner, name, is_param, pin(tensor))
            count += 1
    return count


class TorchCuda:
    """The torch.cuda calls the "cuda" transport makes, one method each (the default ``cuda_api``).

    The streams and events returned are torch.cuda objects; the streamer calls their
    ``record`` / ``wait_event`` / ``synchronize`` methods directly.  A stand-in must
    provide the same methods and objects with those methods.
    """

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device=device)

    def new_event(self):
        return torch.cuda.Event()

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def stream(self, stream):
        """Context manager making ``stream`` the current stream (``torch.cuda.stream``)."""
        return torch.cuda.stream(stream)

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue ``dst <- src`` on the current stream without blocking the host."""
        dst.copy_(src, non_blocking=True)

    def empty(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor on ``device`` (a slot, or a resident tensor's device copy)."""
        return torch.empty(shape, dtype=dtype, device=device)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()


TORCH_CUDA = TorchCuda()


def resolve_mode(mode: str, device: torch.device, home: torch.device) -> str:
    """The transport actually used for ``mode`` (see module docstring)."""
    if mode not in ("auto", "cuda", "copy", "none"):
        raise ValueError(f"unknown streaming mode {mode!r}; expected auto, cuda, copy or none")
    if mode != "auto":
        return mode
    if device == home:
        return "none"
    return "cuda" if device.type == "cuda" else "copy"


class BlockStreamer:
    """Context manager placing ``model``'s weights on ``device`` for one run (see module docstring).

    ``blocks_on_device`` None keeps every block on the device.  ``should_stop`` is
    polled before every block; True raises :class:`SamplingInterrupted`.
    ``trace`` records the executed actions (for tests and diagnostics).
    ``cuda_api`` replaces the torch.cuda calls of the "cuda" transport (:class:`TorchCuda`, for tests).
    ``kept``: device copies of the resident tensors kept between runs (see the module docstring);
    they are released when the run ends with an error other than :class:`SamplingInterrupted`.
    """

    def __init__(self, model: nn.Module, device: Union[str, torch.device],
                 blocks_on_device: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None,
                 mode: str = "auto", cuda_api: Optional[TorchCuda] = None, kept: Optional[KeptWeights] = None):
        self.model = model
        self.cuda = cuda_api or TORCH_CUDA
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.cuda.current_device())
        self.kept = kept
        if kept is not None and kept.device != self.device:  # copies made for another device are no use here
            kept.release()
            kept.device = self.device
        self.uploaded: list[str] = []   # resident tensors copied to the device by this run
        self.reused: list[str] = []     # resident tensors found on the device (kept from an earlier run)
        self.uploaded_bytes = 0
        self.blocks = list(model.transformer_blocks)
        self.blocks_on_device = blocks_on_device
        self.resident, self.streamed = split_blocks(len(self.blocks), blocks_on_device)
        self.should_stop = should_stop or (lambda: False)
        home = next(model.parameters()).device
        self.mode = resolve_mode(mode, self.device, home)
        self.trace: list[Action] = []
        self._homes: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        self._hooks: list = []
        self._slots: list[list[torch.Tensor]] = []
        self._pending: list[Action] = []
        self._swapped: dict[int, list[torch.Tensor]] = {}
        self._computing: dict[int, int] = {}  # streamed block -> slot it is computing from
        self._state: tuple = initial_state(len(self.blocks), blocks_on_device)
        self._copy_stream = None
        self._ready: list = []
        self._done: list = []

    # -- set-up / tear-down ----------------------------------------------------------
    def __enter__(self) -> "BlockStreamer":
        try:
            if self.streamed:  # first: the streamed blocks get the pinned memory (they are copied every step)
                self._prepare_streamed()
            self._place_resident()
            self._install_hooks()
        except BaseException:
            self._restore()
            if self.kept is not None:
                self.kept.release()
            raise
        return self

    def __exit__(self, exc_type=None, exc=None, tb=None) -> None:
        self._restore()
        if self.kept is not None and exc_type is not None and not issubclass(exc_type, SamplingInterrupted):
            self.kept.release()  # an error (out of memory...) leaves no device copy behind

    def _place_resident(self) -> None:
        """Put everything except the streamed blocks on the device (kept copies, else uploads), remembering homes."""
        skip = {id(m) for b in self.streamed for m in self.blocks[b].modules()}
        names = {id(m): n for n, m in self.model.named_modules()}
        resident, missing = [], []
        for owner, name, is_param in _tensor_slots(self.model):
            if id(owner) in skip:
                continue
            home = _get(owner, name, is_param)
            if home.device == self.device:
                continue
            label = f"{names.get(id(owner), '?')}.{name}".lstrip(".")
            resident.append((owner, name))
            copy = self.kept.take(owner, name, home) if self.kept is not None else None
            self._homes.append((owner, name, is_param, home))
            if copy is not None:
                _set(owner, name, is_param, copy)
                self.reused.append(label)
            else:
                missing.append((owner, name, is_param, label))
        if self.kept is not None:
            self.kept.retain(resident)  # blocks streamed now, tensors that live on the device: no second copy
        self._upload(missing)

    def _upload(self, missing: list) -> None:
        """Copy the ``missing`` resident tensors (owner, name, is_param, label) to the device.

        "cuda": from pinned memory when nothing keeps them (pinned in place, once), on the copy
        stream, the compute stream waiting for the last copy; device copies are allocated outside
        the copy stream, so they belong to the compute stream that uses (and frees) them.
        """
        if not missing:
            return
        if self.mode != "cuda":
            for owner, name, is_param, label in missing:
                home = _get(owner, name, is_param)
                copy = home.to(self.device)
                self._uploaded(owner, name, is_param, label, home, copy)
            return
        pin = self.kept is None
        jobs = []
        for owner, name, is_param, label in missing:
            home = _get(owner, name, is_param)
            if pin and home.device.type == "cpu" and not self.cuda.is_pinned(home):
                try:
                    home = self.cuda.pin(home)
                except RuntimeError as exc:  # pinned memory exhausted: copies stay correct, just slower
                    log.warning("StepVideo: could not pin resident weights (%s); uploading from pageable memory", exc)
                    pin = False
                else:
                    _set(owner, name, is_param, home)
                    self._rehome(owner, name, home)
            jobs.append((owner, name, is_param, label, home, self.cuda.empty(tuple(home.shape), home.dtype,
                                                                             self.device)))
        stream = self._side_stream()
        with self.cuda.stream(stream):
            for _, _, _, _, home, copy in jobs:
                self.cuda.copy_(copy, home)
        landed = self.cuda.new_event()
        landed.record(stream)
        self.cuda.current_stream(self.device).wait_event(landed)
        for owner, name, is_param, label, home, copy in jobs:
            self._uploaded(owner, name, is_param, label, home, copy)

    def _rehome(self, owner: nn.Module, name: str, home: torch.Tensor) -> None:
        """Record ``home`` (a pinned replacement) as the home of ``owner.<name>`` for the restore."""
        for i, (o, n, p, _) in enumerate(self._homes):
            if o is owner and n == name:
                self._homes[i] = (o, n, p, home)
                return

    def _uploaded(self, owner, name, is_param, label, home, copy) -> None:
        _set(owner, name, is_param, copy)
        self.uploaded.append(label)
        self.uploaded_bytes += copy.nbytes
        if self.kept is not None:
            self.kept.keep(owner, name, home, copy)

    def _side_stream(self):
        """The copy stream of this run ("cuda"), made on first use."""
        if self._copy_stream is None:
            self._copy_stream = self.cuda.new_stream(self.device)
        return self._copy_stream

    def _prepare_streamed(self) -> None:
        """Pin the streamed blocks' host copies (CUDA, once per model) and allocate the device slots."""
        layout = None
        for b in self.streamed:
            entries = _tensor_slots(self.blocks[b])
            shape = [(n, p, tuple(_get(o, n, p).shape), _get(o, n, p).dtype) for o, n, p in entries]
            if layout is None:
                layout = shape
            elif shape != layout:
                raise ValueError(f"block {b} does not have the same tensors as block {self.streamed[0]}; "
                                 f"streamed blocks must share one layout")
            if self.mode == "cuda":
                try:
                    pin_in_place(self.blocks[b], self.cuda.pin, self.cuda.is_pinned)
                except RuntimeError as exc:  # pinned memory exhausted: copies stay correct, just slower
                    log.warning("StepVideo: could not pin block %d weights (%s); streaming from pageable memory",
                                b, exc)
        if self.mode == "none":
            return
        slots = len(self._state)
        empty = self.cuda.empty if self.mode == "cuda" else (
            lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
        self._slots = [[empty(shape, dtype, self.device) for _, _, shape, dtype in layout] for _ in range(slots)]
        if self.mode == "cuda":
            self._side_stream()
            self._ready = [self.cuda.new_event() for _ in range(slots)]
            self._done = [self.cuda.new_event() for _ in range(slots)]
            for event in self._done:  # slots start free
                event.record(self.cuda.current_stream(self.device))

    def _restore(self) -> None:
        """Every tensor back at its home, hooks removed, device slots dropped (safe to call twice)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # no copy may still write into a slot being freed
            self.cuda.current_stream(self.device).synchronize()
        for b in self.streamed:
            self._swap_out(b)
        for owner, name, is_param, home in reversed(self._homes):
            _set(owner, name, is_param, home)
        self._homes = []
        clear_tables = getattr(self.model, "clear_rope_cache", None)
        if clear_tables is not None:  # the DiT's RoPE tables, kept for the run, may sit on the device
            clear_tables()
        self._slots, self._ready, self._done, self._pending, self._computing = [], [], [], [], {}
        self._copy_stream = None
        self._state = initial_state(len(self.blocks), self.blocks_on_device)

    # -- the schedule, driven by forward hooks -----------------------------------------
    def _install_hooks(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model_start))
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._make_pre_hook(index)))
            if index in self.streamed:
                self._hooks.append(block.register_forward_hook(self._make_post_hook(index)))

    def _on_model_start(self, module, args) -> None:
        if self._pending:
            raise RuntimeError(f"previous model call did not finish its block schedule: {self._pending[:3]}")
        self._pending, self._state = plan_pass(len(self.blocks), self.blocks_on_device, self._state)

    def _make_pre_hook(self, index: int):
        def hook(module, args):
            if self.should_stop():
                raise SamplingInterrupted(f"interrupted before transformer block {index}")
            while self._pending:
                action = self._pending.pop(0)
                self.trace.append(action)
                if action.kind == "fetch":
                    self._fetch(action.block, action.slot)
                    continue
                if action.block != index:
                    raise RuntimeError(f"block {index} ran but the schedule expected block {action.block}")
                if action.slot is not None:
                    self._swap_in(index, action.slot)
                return None
            raise RuntimeError(f"block {index} ran outside a model call's schedule")
        return hook

    def _make_post_hook(self, index: int):
        def hook(module, args, output):
            slot = self._computing.pop(index, None)
            if slot is not None and self.mode == "cuda":
                self._done[slot].record(self.cuda.current_stream(self.device))
            self._swap_out(index)
            return None
        return hook

    def _fetch(self, block: int, slot: int) -> None:
        """Start copying ``block``'s host tensors into ``slot`` (after the slot's previous user finished)."""
        if self.mode == "none":
            return
        sources = [_get(o, n, p) for o, n, p in _tensor_slots(self.blocks[block])]
        targets = self._slots[slot]
        if self.mode == "cuda":
            with self.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._done[slot])
                for dst, src in zip(targets, sources):
                    self.cuda.copy_(dst, src)
                self._ready[slot].record(self._copy_stream)
        else:
            for dst, src in zip(targets, sources):
                dst.copy_(src)

    def _swap_in(self, block: int, slot: int) -> None:
        """Point ``block``'s tensors at ``slot`` (waiting for its copy on CUDA)."""
        self._computing[block] = slot
        if self.mode == "none":
            return
        if self.mode == "cuda":
            self.cuda.current_stream(self.device).wait_event(self._ready[slot])
        entries = _tensor_slots(self.blocks[block])
        self._swapped[block] = [_get(o, n, p) for o, n, p in entries]
        for (owner, name, is_param), tensor in zip(entries, self._slots[slot]):
            _set(owner, name, is_param, tensor)

    def _swap_out(self, block: int) -> None:
        """Point ``block``'s tensors back at their host copies (no-op if not swapped in)."""
        homes = self._swapped.pop(block, None)
        if homes is None:
            return
        for (owner, name, is_param), tensor in zip(_tensor_slots(self.blocks[block]), homes):
            _set(owner, name, is_param, tensor)
