"""The "cuda" transport of BlockStreamer, ordered right, checked on a machine without a GPU.

The streamer makes every CUDA call through one object (``cuda_api``, default
:class:`~stepvideo_core.offload.streamer.TorchCuda`).  Here a recording stand-in takes its
place: it performs the copies for real (so the model still computes the right numbers on
the CPU) and logs every operation in issue order -- copies of a block's tensors into a
slot, event records, stream waits, each block's compute (logged from inside the block's
forward), host synchronisations, pinning, and the moment each slot tensor is freed.

What CUDA guarantees is modelled with vector clocks: operations on one stream run in
order; ``event.record(s)`` captures what stream ``s`` has issued so far;
``s2.wait_event(e)`` makes everything issued on ``s2`` afterwards run after what ``e``
captured (a never-recorded event is a no-op, as in CUDA); ``s.synchronize()`` makes the
host wait for all of ``s``.  An operation A happens before B only when these rules say so.

Invariants (the real code relies on each; :func:`check_order` asserts them):

* copies run on a stream other than the compute stream, from pinned host memory;
* RAW: every streamed block computes from one slot, that slot holds *this* block's
  tensors (its latest copies read this block's home tensors), and those copies happen
  before the compute (the compute stream waited on an event recorded after them);
* WAR: a copy into a slot happens after every compute that read the slot's previous
  contents (the copy stream waited on an event recorded after that compute);
* a slot tensor is freed only after the host waited for every copy and compute that
  touched it; afterwards (also after an interrupt) every tensor points home and no hook is left.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from stepvideo_core.offload import BlockStreamer, SamplingInterrupted, simulate
from stepvideo_core.offload import streamer as streamer_module
from stepvideo_core.offload.streamer import TorchCuda
from stepvideo_core.tiny import TINY_DIT_CONFIG
from tests.core.sampling.conftest import conditioning, tiny_model

FIVE = dict(TINY_DIT_CONFIG, num_layers=5)
CALLS = 3


# --------------------------------------------------------------------------- the recording stand-in

@dataclass
class Op:
    index: int
    kind: str           # copy, record, wait, compute, sync, free, pin, new_stream
    stream: str         # the stream it was issued on, "host" for host-side operations
    clock: dict         # vector clock: what this operation is ordered after
    info: dict = field(default_factory=dict)


class FakeStream:
    def __init__(self, api: "RecordingCuda", name: str):
        self.api, self.name, self.clock = api, name, {}

    def wait_event(self, event: "FakeEvent") -> None:
        self.api._wait(self, event)

    def synchronize(self) -> None:
        self.api._synchronize(self)


class FakeEvent:
    def __init__(self, api: "RecordingCuda", number: int):
        self.api, self.number, self.clock = api, number, None  # None: never recorded

    def record(self, stream: Optional[FakeStream] = None) -> None:
        self.api._record(self, stream if stream is not None else self.api.current)


class RecordingCuda(TorchCuda):
    """A :class:`TorchCuda` stand-in that logs every call (see module docstring). Copies are real."""

    honour_waits = True          # the planted-bug switches of test_the_checker_catches_*
    honour_synchronize = True

    def __init__(self):
        self.ops: list[Op] = []
        self.compute = FakeStream(self, "compute")  # the device's current (default) stream
        self.current = self.compute
        self.host: dict = {}
        self.pinned: set[int] = set()
        self.devices: list = []
        self._streams = 0
        self._events = 0

    # -- the TorchCuda interface ----------------------------------------------------------
    def current_device(self) -> int:
        return 0

    def new_stream(self, device):
        self.devices.append(device)
        self._streams += 1
        stream = FakeStream(self, f"side{self._streams}")
        self._log("new_stream", "host", dict(self.host), name=stream.name)
        return stream

    def new_event(self):
        self._events += 1
        return FakeEvent(self, self._events)

    def current_stream(self, device):
        self.devices.append(device)
        return self.current  # like torch: whatever stream is current *now*

    @contextlib.contextmanager
    def stream(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def copy_(self, dst, src):
        self._tick(self.current, "copy", dst=dst.data_ptr(), src=src.data_ptr(), src_pinned=src.data_ptr() in
                   self.pinned)
        dst.copy_(src)  # for real: the CPU model computes with what was copied

    def pin(self, tensor):
        pinned = tensor.clone()
        self.pinned.add(pinned.data_ptr())
        self._log("pin", "host", dict(self.host), ptr=pinned.data_ptr())
        return pinned

    def is_pinned(self, tensor):
        return tensor.data_ptr() in self.pinned

    # -- what the test adds ---------------------------------------------------------------
    def computes(self, block: int, ptrs: dict) -> None:
        """Block ``block`` computes now (on the current stream) from tensors at ``ptrs`` (name -> data_ptr)."""
        self._tick(self.current, "compute", block=block, ptrs=ptrs)

    def freed(self, ptr: int) -> None:
        self._log("free", "host", dict(self.host), ptr=ptr)

    # -- the model ------------------------------------------------------------------------
    def _log(self, kind, stream, clock, **info) -> Op:
        op = Op(len(self.ops), kind, stream, clock, info)
        self.ops.append(op)
        return op

    def _tick(self, stream: FakeStream, kind: str, **info) -> Op:
        stream.clock[stream.name] = stream.clock.get(stream.name, 0) + 1
        return self._log(kind, stream.name, dict(stream.clock), **info)

    def _record(self, event: FakeEvent, stream: FakeStream) -> None:
        op = self._tick(stream, "record", event=event.number)
        event.clock = dict(op.clock)

    def _wait(self, stream: FakeStream, event: FakeEvent) -> None:
        if event.clock is not None and self.honour_waits:
            stream.clock = merge(stream.clock, event.clock)
        self._tick(stream, "wait", event=event.number, recorded=event.clock is not None)

    def _synchronize(self, stream: FakeStream) -> None:
        if self.honour_synchronize:
            self.host = merge(self.host, stream.clock)
        self._log("sync", "host", dict(self.host), target=stream.name)


def merge(a: dict, b: dict) -> dict:
    return {k: max(a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b)}


def before(a: Op, clock: dict) -> bool:
    """Operation ``a`` happens before whatever carries ``clock``."""
    return a.clock[a.stream] <= clock.get(a.stream, 0)


# --------------------------------------------------------------------------- the invariants

def check_order(ops: list[Op], homes: dict, slots: list[list[int]], streamed: list[int]) -> list[int]:
    """Assert the invariants of the module docstring over one run's ``ops``; returns the computed blocks in order.

    ``homes``: block -> {tensor name: data_ptr of its home tensor}; ``slots``: data_ptrs of
    each slot's tensors; ``streamed``: the streamed blocks.
    """
    slot_of = {ptr: s for s, ptrs in enumerate(slots) for ptr in ptrs}
    last_copy: dict[int, Op] = {}
    readers: dict[int, list[Op]] = {ptr: [] for ptr in slot_of}
    touched: dict[int, list[Op]] = {ptr: [] for ptr in slot_of}
    freed: list[int] = []
    computed = []
    for op in ops:
        if op.kind == "copy":
            dst = op.info["dst"]
            assert dst in slot_of, f"op {op.index}: a copy into something that is not a slot"
            assert op.stream != "compute", f"op {op.index}: copy issued on the compute stream (no overlap)"
            assert op.info["src_pinned"], f"op {op.index}: non-blocking copy from pageable memory"
            for reader in readers[dst]:
                assert before(reader, op.clock), (f"op {op.index}: slot {slot_of[dst]} refilled before block "
                                                  f"{reader.info['block']}'s compute from it (op {reader.index}) "
                                                  f"finished")
            last_copy[dst], readers[dst] = op, []
            touched[dst].append(op)
        elif op.kind == "compute":
            block, ptrs = op.info["block"], op.info["ptrs"]
            computed.append(block)
            assert op.stream == "compute", f"op {op.index}: block {block} computed on {op.stream}"
            if block not in streamed:
                assert ptrs == homes[block], f"resident block {block} does not compute from its own tensors"
                continue
            used = {slot_of.get(p) for p in ptrs.values()}
            assert len(used) == 1 and None not in used, f"block {block} computes from slots {used}"
            assert sorted(ptrs.values()) == sorted(slots[next(iter(used))]), f"block {block}: not a whole slot"
            for name, ptr in ptrs.items():
                copied = last_copy.get(ptr)
                assert copied is not None, f"block {block} computes from slot {used} before anything was copied"
                assert copied.info["src"] == homes[block][name], (f"block {block} computes from a slot holding "
                                                                  f"another block's {name}")
                assert before(copied, op.clock), (f"op {op.index}: block {block} computes before its copy of "
                                                  f"{name} (op {copied.index}) landed")
                readers[ptr].append(op)
                touched[ptr].append(op)
        elif op.kind == "free" and op.info["ptr"] in slot_of:
            ptr = op.info["ptr"]
            freed.append(ptr)
            for used in touched[ptr]:
                assert before(used, op.clock), (f"slot {slot_of[ptr]} freed while op {used.index} ({used.kind}) "
                                                f"may still run")
    assert sorted(freed) == sorted(slot_of), "every slot tensor is freed exactly once when the run ends"
    return computed


# --------------------------------------------------------------------------- running a model under it

def inputs_for(seed: int):
    gen = torch.Generator().manual_seed(seed)
    cond = [conditioning(1, valid=5, config=FIVE), conditioning(2, valid=2, config=FIVE)]
    kw = {k: torch.cat([c[k] for c in cond]) for k in ("encoder_hidden_states", "encoder_hidden_states_2",
                                                       "encoder_attention_mask")}
    return dict(hidden_states=torch.randn(2, 3, 64, 2, 2, generator=gen), timestep=torch.tensor([0.3, 0.3]), **kw)


def tensors(module) -> dict:
    return {n: t.data_ptr() for n, t in list(module.named_parameters()) + list(module.named_buffers())}


def instrument(model, api: RecordingCuda):
    """Make every block log its compute (with the tensors it computes from) from inside its forward."""
    for index, block in enumerate(model.transformer_blocks):
        forward = block.forward

        def logged(*args, _index=index, _block=block, _forward=forward, **kwargs):
            api.computes(_index, tensors(_block))
            return _forward(*args, **kwargs)
        block.forward = logged


class Run:
    """One BlockStreamer run of ``calls`` model calls under a recording ``api``, with everything the checks need."""

    def __init__(self, model, blocks_on_device, api=None, calls=CALLS, should_stop=None):
        self.api = api or RecordingCuda()
        self.first_op = len(self.api.ops)  # an api may serve several runs
        self.model = model
        self.outputs, self.error = [], None
        instrument(model, self.api)
        self.streamer = BlockStreamer(model, "cpu", blocks_on_device, should_stop=should_stop, mode="cuda",
                                      cuda_api=self.api)
        try:
            with torch.no_grad(), self.streamer:
                # after __enter__: streamed blocks point at their (now pinned) home tensors, resident
                # ones at their device copies -- the home tensors themselves here, the device is the CPU
                self.homes = {b: tensors(block) for b, block in enumerate(model.transformer_blocks)}
                self.slots = [[t.data_ptr() for t in slot] for slot in self.streamer._slots]
                self.watch = [weakref.ref(t, lambda _, p=t.data_ptr(): self.api.freed(p))
                              for slot in self.streamer._slots for t in slot]
                for call in range(calls):
                    self.outputs.append(model(**inputs_for(call)))
        except SamplingInterrupted as exc:
            self.error = exc
        finally:
            for block in model.transformer_blocks:
                block.__dict__.pop("forward", None)

    def check(self):
        return check_order(self.api.ops[self.first_op:], self.homes, self.slots, self.streamer.streamed)

    def ops(self, kind):
        return [op for op in self.api.ops[self.first_op:] if op.kind == kind]


@pytest.fixture
def model():
    return tiny_model(torch.float32, config=FIVE)


def reference_outputs(model, calls=CALLS):
    plain = copy.deepcopy(model)  # no streamer, no hooks, its own tensors
    with torch.no_grad():
        return [plain(**inputs_for(call)) for call in range(calls)]


def everything_home(model, run: Run) -> None:
    for b, block in enumerate(model.transformer_blocks):
        assert tensors(block) == run.homes[b], f"block {b} does not point home"
    assert not model._forward_pre_hooks and not any(b._forward_pre_hooks or b._forward_hooks
                                                    for b in model.transformer_blocks)
    assert all(ref() is None for ref in run.watch), "a slot tensor outlived the run"
    s = run.streamer
    assert s._slots == [] and s._swapped == {} and s._homes == [] and s._copy_stream is None


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("blocks_on_device", [0, 2, 3, 4])  # 5, 3 (slots rotate), 2, 1 streamed blocks
def test_every_block_computes_after_its_copy_and_no_slot_is_refilled_early(model, blocks_on_device):
    want = reference_outputs(model)
    run = Run(model, blocks_on_device)
    computed = run.check()
    assert computed == list(range(5)) * CALLS
    assert run.streamer.trace == [a for actions in simulate(5, blocks_on_device, CALLS) for a in actions]
    streamed = 5 - blocks_on_device
    copies = run.ops("copy")
    per_block = len(run.slots[0])
    if streamed <= 2:  # copied once, then they stay in their slots
        assert len(copies) == streamed * per_block
    else:  # every pass copies every streamed block, the last one also the first of a next pass (wrap-around)
        assert len(copies) == (CALLS * streamed + 1) * per_block
    assert {d for d in run.api.devices} == {torch.device("cpu")}
    assert all(torch.equal(a, b) for a, b in zip(run.outputs, want))
    everything_home(model, run)


def test_an_interrupt_mid_pass_waits_for_the_prefetch_before_freeing(model):
    polls = []

    def stop_in_block_three_of_call_two():
        polls.append(1)
        return len(polls) == 5 + 4

    run = Run(model, 1, should_stop=stop_in_block_three_of_call_two)
    assert isinstance(run.error, SamplingInterrupted) and "block 3" in str(run.error)
    computed = run.check()  # includes: both slots freed only after the host waited for their copies
    assert computed == [0, 1, 2, 3, 4, 0, 1, 2]
    prefetch = run.ops("copy")[-len(run.slots[0]):]
    assert {op.info["src"] for op in prefetch} == set(run.homes[3].values())  # block 3's, never computed from
    everything_home(model, run)


def test_pinning_happens_once_and_every_copy_reads_pinned_memory(model):
    api = RecordingCuda()
    first = Run(model, 2, api=api, calls=1)
    first.check()
    pins = [op for op in api.ops if op.kind == "pin"]
    assert len(pins) == 3 * len(first.slots[0])  # every tensor of the 3 streamed blocks, once
    assert all(p in api.pinned for b in (2, 3, 4) for p in first.homes[b].values())
    second = Run(model, 2, api=api, calls=1)
    second.check()
    assert [op for op in api.ops if op.kind == "pin"] == pins  # nothing pinned (allocated) again
    assert second.homes == first.homes
    everything_home(model, second)


class DroppedWaits(RecordingCuda):
    honour_waits = False


class DroppedSynchronize(RecordingCuda):
    honour_synchronize = False


class CopiesOnComputeStream(RecordingCuda):
    @contextlib.contextmanager
    def stream(self, stream):
        yield


class WaitsOnlyOnTheComputeStream(RecordingCuda):
    def _wait(self, stream, event):
        if stream is self.compute:
            return super()._wait(stream, event)
        self._tick(stream, "wait", event=event.number, recorded=event.clock is not None)


@pytest.mark.parametrize("broken, message", [
    (DroppedWaits, "computes before its copy"),               # compute stream does not wait for the copy
    (WaitsOnlyOnTheComputeStream, "refilled before block"),   # copy stream does not wait for the compute
    (DroppedSynchronize, "freed while op"),                  # slots freed while streams still run
    (CopiesOnComputeStream, "copy issued on the compute stream"),
])
def test_the_checker_catches_each_ordering_bug(model, broken, message):
    """Guard the guard: each broken transport makes :func:`check_order` fail with its reason."""
    run = Run(model, 2, api=broken())
    with pytest.raises(AssertionError, match=message):
        run.check()


def test_the_default_api_is_the_torch_cuda_calls(monkeypatch):
    """TorchCuda forwards each call to torch.cuda with the arguments the streamer always used."""
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls.append("current_device") or 3)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: calls.append(("Stream", a, k)) or "stream")
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: calls.append(("Event", a, k)) or "event")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: calls.append(("current_stream", a, k)) or "cur")
    monkeypatch.setattr(torch.cuda, "stream", lambda *a, **k: calls.append(("stream", a, k)) or "ctx")
    api, dev = streamer_module.TORCH_CUDA, torch.device("cuda", 1)
    assert isinstance(api, TorchCuda)
    assert api.current_device() == 3 and api.new_stream(dev) == "stream" and api.new_event() == "event"
    assert api.current_stream(dev) == "cur" and api.stream("s") == "ctx"
    assert calls == ["current_device", ("Stream", (), {"device": dev}), ("Event", (), {}),
                     ("current_stream", (dev,), {}), ("stream", ("s",), {})]

    class Tensorish:
        def __init__(self):
            self.seen = []

        def copy_(self, *a, **k):
            self.seen.append(("copy_", a, k))

        def pin_memory(self, *a, **k):
            self.seen.append(("pin_memory", a, k))
            return "pinned"

        def is_pinned(self, *a, **k):
            self.seen.append(("is_pinned", a, k))
            return True

    dst, src = Tensorish(), Tensorish()
    api.copy_(dst, src)
    assert dst.seen == [("copy_", (src,), {"non_blocking": True})]
    assert api.pin(src) == "pinned" and api.is_pinned(src) is True
    assert src.seen == [("pin_memory", (), {}), ("is_pinned", (), {})]
    assert BlockStreamer(tiny_model(torch.float32), "cpu", 1, mode="cuda").cuda is api  # the default
