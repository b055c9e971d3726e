"""What the sampler node hands the core: the plan's blocks_on_device and CFG batching reach ``sample`` and the
block streamer, and the handle's attention choice reaches every attention call.

On the CPU the plan keeps every block in RAM whatever the handle asks (nothing to stream to); on a GPU the
plan's number is what the streamer keeps resident.  The GPU is faked at the bridge (free VRAM) and the run
itself happens on the CPU with real slot copies (``sample_calls`` in conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from stepvideo_core.offload.planner import GiB
from tests.core.sampling.conftest import conditioning, tiny_model
from tests.nodes.test_sampler_node import build_meta_30b, run

CUDA = torch.device("cuda", 0)


def make_handle(types_mod, transformer, **kw):
    fields = dict(transformer=transformer, dtype=torch.float32, device=torch.device("cpu"),
                  offload_device=torch.device("cpu"), attention="sdpa", source=Path("tiny"))
    fields.update(kw)
    return types_mod.StepVideoModelHandle(**fields)


# ----------------------------------------------------------------------------- blocks_on_device


def test_cpu_runs_keep_every_block_in_ram_whatever_the_handle_asks(sampler_mod, types_mod, dit, sample_calls):
    for choice in ("auto", "all", "1", "0"):
        latent, text = run(sampler_mod, make_handle(types_mod, dit, blocks_on_device=choice),
                           conditioning(1), conditioning(2))
        call = sample_calls[-1]
        assert call["device"] == torch.device("cpu") and call["blocks_on_device"] is None, choice
        assert call["streamer"].streamed == [] and "all 2 blocks in RAM" in text, choice


def test_gpu_plan_number_reaches_the_streamer(sampler_mod, types_mod, dit, fake_gpu, sample_calls):
    """A fixed count on a (fake) GPU: the streamer keeps that many blocks resident and streams the rest,
    and the streamed run gives the resident CPU run's latents bit for bit."""
    fake_gpu(80 * GiB)
    pos, neg = conditioning(1), conditioning(2)
    streamed, text = run(sampler_mod, make_handle(types_mod, dit, device=CUDA, blocks_on_device="1"), pos, neg)
    call = sample_calls[-1]
    assert call["device"] == CUDA and call["blocks_on_device"] == 1 and call["batch_cfg"] is True
    streamer = call["streamer"]
    assert (streamer.resident, streamer.streamed, streamer.mode) == ([0], [1], "copy")
    assert {a.block for a in streamer.trace if a.kind == "fetch"} == {1}  # block 1 copied into a slot, per call
    assert "1 of 2 blocks on the device, 1 streamed" in text
    resident, _ = run(sampler_mod, make_handle(types_mod, dit), pos, neg)
    assert sample_calls[-1]["streamer"].streamed == []
    assert torch.equal(streamed["samples"], resident["samples"])


@pytest.mark.parametrize("weight_format, choice, frames, gib, blocks, batch_cfg, message", [
    ("fp8_scaled", "auto", 204, 24, 2, True, "2 of 48 blocks on the device, 46 streamed"),
    ("fp8_scaled", "auto", 204, 20, 11, False, "(CFG branches one after the other)"),
    ("full", "5", 51, 80, 5, True, "5 of 48 blocks on the device, 43 streamed"),
    ("full", "auto", 51, 80, None, True, "all 48 blocks on the device"),
    ("full", "all", 204, 24, None, True, "all 48 blocks on cuda:0"),
])
def test_gpu_plan_of_the_30b_model_reaches_sample(sampler_mod, types_mod, fake_gpu, sample_calls,
                                                  weight_format, choice, frames, gib, blocks, batch_cfg, message):
    """The released shapes (meta device, nothing computed): the planner's choice for the free VRAM is the
    ``blocks_on_device`` and ``batch_cfg`` that ``sample`` gets (None = every block stays on the GPU)."""
    freed = fake_gpu(gib * GiB)
    big = make_handle(types_mod, build_meta_30b(), dtype=torch.bfloat16, device=CUDA,
                      weight_format=weight_format, blocks_on_device=choice)
    _, text = run(sampler_mod, big, conditioning(1), conditioning(2), preset="Step-Video-T2V",
                  width=992, height=544, frames=frames, steps=1)
    call = sample_calls[-1]
    assert (call["device"], call["blocks_on_device"], call["batch_cfg"]) == (CUDA, blocks, batch_cfg)
    assert message in text
    assert (" (CFG one branch at a time)" in text) == (not batch_cfg)
    assert [device for _, device in freed] == [CUDA]  # ComfyUI is asked for room first, "all" included


# ----------------------------------------------------------------------------- attention backend


@pytest.fixture
def attention_calls(monkeypatch):
    """Record ``(backend, masked)`` of every call of the attention dispatch the DiT blocks use.

    Patched in the module the tiny DiT's block code was imported from (found from the model's block
    class, so it is the copy that really runs, whichever import path built the model).
    """
    calls = []

    def install(model):
        blocks = sys.modules[type(model.transformer_blocks[0]).__module__]
        real = blocks.attention

        def spy(q, k, v, *, mask=None, backend="sdpa"):
            calls.append((backend, mask is not None))
            return real(q, k, v, mask=mask, backend=backend)

        monkeypatch.setattr(blocks, "attention", spy)
        return calls

    return install


def test_each_handle_runs_its_own_attention_backend_on_a_shared_transformer(sampler_mod, types_mod,
                                                                            attention_calls, one_thread):
    shared = tiny_model(torch.float32)
    calls = attention_calls(shared)
    sdpa = make_handle(types_mod, shared, attention="sdpa")
    auto = make_handle(types_mod, shared, attention="auto")
    per_run = 2 * shared.config.num_layers  # steps=2, CFG batched: one call per step, self + cross per block
    seen, outputs = [], []
    for handle in (auto, sdpa, auto):
        calls.clear()
        latent, _ = run(sampler_mod, handle, conditioning(1), conditioning(2), steps=2)
        assert len(calls) == 2 * per_run
        seen.append({backend for backend, _ in calls})
        assert sum(masked for _, masked in calls) == per_run  # the cross-attention calls get the backend too
        outputs.append(latent["samples"])
    assert seen == [{"auto"}, {"sdpa"}, {"auto"}]
    assert torch.equal(outputs[0], outputs[1])  # "auto" on the CPU resolves every call to SDPA
