"""Resident weights kept on the device between runs (KeptWeights), checked with the recording CUDA stand-in.

The streamer runs its "cuda" transport for a model whose home is the CPU and whose compute device is
called ``cuda:0``: :class:`DeviceCuda` (the recording stand-in of test_streamer_cuda_order.py) makes the
device allocations on the CPU, so the model computes for real while every upload is logged as a
copy whose source is a home tensor.  What must hold:

* the first run uploads every resident tensor -- on the copy stream, and the compute stream waits;
  without kept weights from pinned memory, and the device copies die with the run;
* with kept weights, a second run copies no resident tensor at all (only streamed blocks' slots);
* releasing them (what ComfyUI's eviction calls) frees every device copy and leaves the model home;
  the next run uploads again; a LoRA merge re-uploads exactly the tensors it changed;
* outputs are the unstreamed model's, bit for bit, every run.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from stepvideo_core.lora import LoraEntry, attached, load_lora
from stepvideo_core.offload import BlockStreamer, SamplingInterrupted
from stepvideo_core.offload.kept import KeptWeights, kept_weights, kept_weights_of, resident_bytes
from stepvideo_core.tiny import write_tiny_lora
from tests.core.offload.test_streamer_cuda_order import FIVE, RecordingCuda, before, inputs_for, instrument
from tests.core.sampling.conftest import tiny_model

CUDA = torch.device("cuda", 0)


class DeviceCuda(RecordingCuda):
    """The recording stand-in with "device" allocations made on the CPU (logged as ``alloc``, watched)."""

    def __init__(self):
        super().__init__()
        self.allocated = []

    def empty(self, shape, dtype, device):
        self._log("alloc", "host", dict(self.host), device=device)
        tensor = torch.empty(shape, dtype=dtype)
        self.allocated.append(weakref.ref(tensor))
        return tensor

    def alive(self) -> int:
        """Device allocations still alive."""
        return sum(ref() is not None for ref in self.allocated)


@pytest.fixture
def model():
    return tiny_model(torch.float32, config=FIVE)


def reference(model, calls=2):
    plain = copy.deepcopy(model)
    with torch.no_grad():
        return [plain(**inputs_for(call)) for call in range(calls)]


def homes(model) -> dict:
    return {name: t.data_ptr() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def resident_names(model, blocks_on_device):
    streamed = tuple(f"transformer_blocks.{b}." for b in range(blocks_on_device or 5, 5))
    return sorted(n for n in homes(model) if not n.startswith(streamed))


class KeptRun:
    """One streamer run on ``cuda:0`` (computing on the CPU) under ``api``; records what it copied."""

    def __init__(self, model, api, kept=None, blocks_on_device=None, calls=2, should_stop=None, fail=False):
        self.first = len(api.ops)
        self.api, self.model = api, model
        self.home = homes(model)
        self.streamer = BlockStreamer(model, CUDA, blocks_on_device, mode="cuda", cuda_api=api, kept=kept,
                                      should_stop=should_stop)
        self.outputs, self.error = [], None
        instrument(model, api)  # each block logs its compute
        try:
            with torch.no_grad(), self.streamer:
                self.during = homes(model)
                self.slots = {t.data_ptr() for slot in self.streamer._slots for t in slot}
                for call in range(calls):
                    self.outputs.append(model(**inputs_for(call)))
                if fail:
                    raise RuntimeError("CUDA out of memory (planted)")
        except (SamplingInterrupted, RuntimeError) as exc:
            if not (fail or should_stop):
                raise
            self.error = exc
        finally:
            for block in model.transformer_blocks:
                block.__dict__.pop("forward", None)

    def ops(self, kind):
        return [op for op in self.api.ops[self.first:] if op.kind == kind]

    def resident_copies(self):
        """Copies into a resident tensor's device copy (uploads), as opposed to streamed blocks' slot fills."""
        return [op for op in self.ops("copy") if op.info["dst"] not in self.slots]


def test_without_kept_weights_every_run_uploads_from_pinned_memory_on_the_copy_stream(model):
    want = reference(model)
    api = DeviceCuda()
    first = KeptRun(model, api)
    uploads = first.resident_copies()
    assert len(uploads) == len(homes(model)) and sorted(first.streamer.uploaded) == sorted(homes(model))
    assert all(op.stream != "compute" and op.info["src_pinned"] for op in uploads)
    computes = first.ops("compute")
    assert computes and all(before(up, computes[0].clock) for up in uploads)  # the compute stream waited
    assert len(api.allocated) == len(homes(model)) and api.alive() == 0  # the device copies went with the run
    assert all(torch.equal(a, b) for a, b in zip(first.outputs, want))
    pinned = homes(model)  # the pinned copies became the homes (once)
    assert set(pinned.values()) <= api.pinned
    second = KeptRun(model, api)  # uploads again, pins nothing
    assert len(second.resident_copies()) == len(homes(model)) and not second.ops("pin")
    assert homes(model) == pinned and all(torch.equal(a, b) for a, b in zip(second.outputs, want))


@pytest.mark.parametrize("blocks_on_device", [None, 3], ids=["all-resident", "3-resident-2-streamed"])
def test_a_second_run_moves_no_resident_weight(model, blocks_on_device):
    want = reference(model)
    api, kept = DeviceCuda(), KeptWeights(CUDA)
    first = KeptRun(model, api, kept, blocks_on_device)
    names = resident_names(model, blocks_on_device)
    assert sorted(first.streamer.uploaded) == names and first.streamer.reused == []
    assert len(first.resident_copies()) == len(names) and kept.count == len(names)
    assert kept.nbytes == resident_bytes(model, blocks_on_device, CUDA) == first.streamer.uploaded_bytes
    resident_home = lambda: {n: p for n, p in homes(model).items() if n in names}  # noqa: E731
    assert resident_home() == {n: first.home[n] for n in names}  # outside a run: home, as always
    assert api.alive() == len(names)  # the kept copies live on; the streaming slots went
    second = KeptRun(model, api, kept, blocks_on_device)
    assert second.resident_copies() == [] and second.streamer.uploaded == []
    assert sorted(second.streamer.reused) == names
    assert len(second.ops("alloc")) == len(second.slots)  # nothing allocated but the streaming slots
    assert second.during == first.during  # the very device copies of the first run
    for run in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(run.outputs, want))


def test_an_eviction_frees_the_copies_the_model_stays_home_and_the_next_run_uploads(model):
    want = reference(model)
    api, kept = DeviceCuda(), KeptWeights(CUDA)
    first = KeptRun(model, api, kept)
    size = kept.nbytes
    assert api.alive() == len(homes(model))
    assert kept.release() == size and kept.count == 0 and kept.releases == 1  # ComfyUI evicted them
    assert api.alive() == 0 and homes(model) == first.home
    again = KeptRun(model, api, kept)
    assert len(again.resident_copies()) == len(homes(model)) and kept.nbytes == size
    assert all(torch.equal(a, b) for a, b in zip(again.outputs, want))


def test_a_plan_that_streams_more_blocks_drops_their_kept_copies(model):
    api, kept = DeviceCuda(), KeptWeights(CUDA)
    KeptRun(model, api, kept)  # all resident
    whole = kept.nbytes
    fewer = KeptRun(model, api, kept, blocks_on_device=2)
    assert fewer.resident_copies() == []  # what stays resident was kept
    assert kept.count == len(resident_names(model, 2)) and kept.nbytes == resident_bytes(model, 2, CUDA) < whole
    more = KeptRun(model, api, kept, blocks_on_device=4)
    assert sorted(more.streamer.uploaded) == sorted(n for n in resident_names(model, 4)
                                                    if n.startswith(("transformer_blocks.2.", "transformer_blocks.3.")))


def test_a_lora_merge_reuploads_exactly_the_tensors_it_changed(model, tmp_path):
    base = reference(model)
    path, _ = write_tiny_lora(tmp_path / "a.safetensors", config=FIVE, style="official", keys="peft", rank=4, seed=1)
    adapter = load_lora(path, model)
    api, kept = DeviceCuda(), kept_weights(model, CUDA)
    assert kept_weights_of(model) is kept
    KeptRun(model, api, kept)
    with attached(model, [LoraEntry(adapter, 0.8, "merge")]) as att:
        merged_names = sorted(f"{m}.weight" if not m.endswith((".bias",)) else m for m in att.merged)
        want = reference(model)
        merged = KeptRun(model, api, kept)
    assert sorted(merged.streamer.uploaded) == merged_names  # the merged weights, nothing else
    assert all(torch.equal(a, b) for a, b in zip(merged.outputs, want))
    restored = KeptRun(model, api, kept)
    assert sorted(restored.streamer.uploaded) == merged_names  # the exact base weights again
    assert all(torch.equal(a, b) for a, b in zip(restored.outputs, base))


def test_an_error_releases_the_kept_weights_an_interrupt_keeps_them(model):
    api, kept = DeviceCuda(), KeptWeights(CUDA)
    stopped = KeptRun(model, api, kept, should_stop=lambda: len(api.ops) > 60)
    assert isinstance(stopped.error, SamplingInterrupted) and kept.count == len(homes(model))
    assert homes(model) == stopped.home
    failed = KeptRun(model, api, kept, fail=True)
    assert isinstance(failed.error, RuntimeError) and kept.count == 0 and homes(model) == failed.home


def test_copies_for_another_device_are_released_first(model):
    api, kept = DeviceCuda(), KeptWeights(torch.device("cuda", 1))
    kept.keep(model, "scale_shift_table", model.scale_shift_table.data, torch.zeros(2, 2))
    KeptRun(model, api, kept, calls=1)
    assert kept.device == CUDA and kept.count == len(homes(model)) and kept.releases == 1
