"""StepVideo Sampler's ``gpus`` / ``parallel`` inputs: bad configurations refused before anything starts,
and on the CPU (the test mode: worker processes on gloo) the same latents as one process, workers kept
between runs, a ComfyUI interrupt stopping every rank, and the workers stopped when the model is freed."""

from __future__ import annotations

import gc
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from stepvideo_core.tiny import write_tiny_dit
from tests.core.sampling.conftest import conditioning

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = dict(width=32, height=48, frames=17)


@pytest.fixture
def multi(pack, bridge):
    module = sys.modules[f"{pack.__name__}.nodes.multi_gpu"]
    yield module
    module.release("end of test")


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("dit"))


def loaded(pack, types_mod, source, **kw):
    """A handle as StepVideo Model Loader makes it: the transformer loaded from ``source`` (the workers load it too)."""
    core = sys.modules[f"{pack.__name__}.stepvideo_core"]
    transformer = core.load_transformer(source, dtype=torch.float32)
    base = dict(transformer=transformer, dtype=torch.float32, device=torch.device("cpu"),
                offload_device=torch.device("cpu"), attention="sdpa", source=Path(source),
                weight_format=transformer.weight_format)
    base.update(kw)
    return types_mod.StepVideoModelHandle(**base)


def run(sampler_mod, model, **kw):
    args = dict(preset="Step-Video-T2V-Turbo", **SIZE, steps=2, cfg=0.0, shift=0.0, seed=3)
    args.update(kw)
    out = sampler_mod.StepVideoSampler().sample(model=model, positive=conditioning(1), negative=conditioning(2), **args)
    (latent,) = out["result"]
    return latent["samples"], out["ui"]["text"][0]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_gpus_and_parallel_are_optional_inputs(pack):
    spec = pack.NODE_CLASS_MAPPINGS["StepVideoSampler"].INPUT_TYPES()
    assert "gpus" not in spec["required"] and "parallel" not in spec["required"]  # saved API graphs still validate
    kind, options = spec["optional"]["gpus"]
    assert kind == "INT" and (options["default"], options["min"], options["max"]) == (1, 1, 8)
    choices, options = spec["optional"]["parallel"]
    assert choices == ["auto", "ulysses", "cfg"] and options["default"] == "auto"


def test_more_gpus_than_cuda_shows_are_refused_before_anything_starts(sampler_mod, multi, types_mod, pack, dit_dir,
                                                                      monkeypatch):
    cuda = loaded(pack, types_mod, dit_dir, device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=r"StepVideo Sampler: gpus is 4 but 2 CUDA GPUs are visible to ComfyUI "
                                         r"\(CUDA_VISIBLE_DEVICES=0,1; .*\); set gpus to 2 or fewer"):
        run(sampler_mod, cuda, gpus=4)
    assert multi.active_pool() is None
    assert [str(d) for d in multi.devices_for(types.SimpleNamespace(device=torch.device("cuda", 1)), 2)] == \
        ["cuda:1", "cuda:0"]  # ComfyUI's GPU is rank 0, the workers take the others
    with pytest.raises(ValueError, match="runs one worker process per CUDA GPU, but ComfyUI computes on mps"):
        multi.devices_for(types.SimpleNamespace(device=torch.device("mps")), 2)


@pytest.mark.parametrize("kw, message", [
    (dict(gpus=3, cfg=1.0), r"gpus 3, parallel auto: sequence parallel splits the 2 attention heads over 3 ranks, "
                            r"which does not divide them; use a number of processes in \[1, 2\]"),
    (dict(gpus=2, parallel="cfg", cfg=1.0), r"CFG parallel needs guidance"),
    (dict(gpus=3, parallel="cfg", cfg=5.0), r"needs an even number of processes, got 3"),
])
def test_layouts_that_cannot_run_are_refused_before_anything_starts(sampler_mod, multi, types_mod, pack, dit_dir, kw,
                                                                    message):
    parallel = sys.modules[f"{pack.__name__}.stepvideo_core.parallel"]
    with pytest.raises(parallel.ParallelConfigError, match="StepVideo Sampler: " + message if "gpus 3, p" in message
                       else message):
        run(sampler_mod, loaded(pack, types_mod, dit_dir), **kw)
    assert multi.active_pool() is None


def test_gpus_2_on_the_cpu_gives_the_latents_of_one_process_and_keeps_the_workers(sampler_mod, multi, types_mod, pack,
                                                                                  dit_dir):
    model = loaded(pack, types_mod, dit_dir)
    one, _ = run(sampler_mod, model, cfg=5.0)
    two, text = run(sampler_mod, model, cfg=5.0, gpus=2)
    assert rel(two, one) <= 1e-5
    pool = multi.active_pool()
    pids = dict(pool.pids)
    assert f"workers: rank 1 pid {pids[1]} on cpu" in text and "CFG parallel" in text
    again, text = run(sampler_mod, model, cfg=5.0, gpus=2, parallel="ulysses")
    assert rel(again, one) <= 1e-5 and "Ulysses sequence parallel over 2 ranks" in text
    assert multi.active_pool() is pool and pool.pids == pids  # loaded once, kept between runs

    other = loaded(pack, types_mod, dit_dir)  # another model: its own workers, the old ones stopped
    run(sampler_mod, other, gpus=2)
    assert multi.active_pool() is not pool and pool.closed
    procs = [w.process for w in multi.active_pool()._workers]
    del other
    gc.collect()
    deadline = time.monotonic() + 30
    while multi.active_pool() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert multi.active_pool() is None, "freeing the model did not stop its workers"
    assert [p.exitcode for p in procs] == [0]  # asked to stop, not killed


def test_a_comfyui_interrupt_stops_every_rank_and_the_workers_wait_for_the_next_run(sampler_mod, multi, types_mod, pack,
                                                                                    dit_dir, bridge, monkeypatch):
    """ComfyUI's progress bar raises its InterruptProcessingException (and clears the flag) on the update
    after an interrupt: rank 0 must not leave the ranks' lock-step for it, but stop with them."""

    class InterruptProcessingException(BaseException):  # as ComfyUI's (comfy.model_management)
        pass

    state = {"flag": False, "updates": 0}

    class ProgressBar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            state["updates"] += 1
            state["flag"] = True  # the user presses Cancel during the first step
            if state["flag"]:
                state["flag"] = False
                raise InterruptProcessingException()

    def throw():
        if state["flag"]:
            state["flag"] = False
            raise InterruptProcessingException()

    mm = types.SimpleNamespace(InterruptProcessingException=InterruptProcessingException,
                               processing_interrupted=lambda: state["flag"],
                               throw_exception_if_processing_interrupted=throw, soft_empty_cache=lambda: None)
    model = loaded(pack, types_mod, dit_dir)
    run(sampler_mod, model, gpus=2)
    pool = multi.active_pool()
    pids = dict(pool.pids)
    monkeypatch.setitem(bridge._MODULES, "comfy.utils", types.SimpleNamespace(ProgressBar=ProgressBar))
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", mm)
    monkeypatch.setattr(bridge, "cuda_api", lambda: None)
    with pytest.raises(InterruptProcessingException):
        run(sampler_mod, model, gpus=2, steps=20)
    assert state["updates"] == 1
    assert pool.last_replies == {1: "interrupted"} and pool.healthy() and pool.pids == pids
    monkeypatch.setitem(bridge._MODULES, "comfy.utils", None)
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", None)
    after, _ = run(sampler_mod, model, gpus=2)
    assert multi.active_pool() is pool and pool.pids == pids
    one, _ = run(sampler_mod, model)
    assert rel(after, one) <= 1e-5


class _Planned(Exception):
    """Raised by the spy once the sampler node handed its run to the orchestration."""


@pytest.mark.parametrize("parallel, layout", [("ulysses", (2, 2, 1)), ("cfg", (2, 1, 2))])
def test_the_run_is_planned_per_rank_of_the_workers_layout(sampler_mod, multi, types_mod, pack, dit_dir, monkeypatch,
                                                           parallel, layout):
    """With gpus > 1 each GPU holds a share of the run: the node plans with the workers' layout (a rank's
    tokens, one branch on a CFG rank); with one GPU there is no layout."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("layout"))
        raise _Planned

    monkeypatch.setattr(sampler_mod, "plan_and_sample", spy)
    model = loaded(pack, types_mod, dit_dir)
    for gpus in (1, 2):
        with pytest.raises(_Planned):
            run(sampler_mod, model, cfg=5.0, gpus=gpus, parallel=parallel)
    assert seen[0] is None
    assert (seen[1].world, seen[1].sp, seen[1].cfg) == layout
    assert multi.active_pool() is None  # planning starts no worker


def test_the_vae_decode_is_shared_with_running_gpu_workers(sampler_mod, multi, types_mod, pack, dit_dir, models_dir,
                                                           bridge, monkeypatch):
    """With the sampler's workers up, StepVideo VAE Decode gives each rank a share of the 17-frame chunks
    (this process decodes 1 of 2, a worker loads the VAE from its file and decodes the other): the frames
    of the one-process decode, bit for bit in fp32; use_gpu_workers off, or no workers, decodes alone."""
    from tests.factory import write_tiny_vae

    vae_mod = sys.modules[f"{pack.__name__}.nodes.vae"]
    vae_file = write_tiny_vae(models_dir / "vae", layout="single", seed=2)
    (vae,) = vae_mod.StepVideoVAELoader().load(vae_name=vae_file.name, weight_dtype="fp32")["result"]
    samples = {"samples": torch.randn(1, 8, 6, 2, 3, generator=torch.Generator().manual_seed(4))}  # 2 chunks
    decode = vae_mod.StepVideoVAEDecode().decode
    chunks = []

    class Bar:
        def __init__(self, total):
            pass

        def update_absolute(self, done, total, preview=None):
            chunks.append((done, total))

    monkeypatch.setattr(bridge, "progress_bar", Bar)
    (alone,) = decode(vae=vae, samples=samples)
    assert chunks == [(1, 2), (2, 2)] and multi.active_pool() is None  # no workers: this process alone
    model = loaded(pack, types_mod, dit_dir)  # kept: freeing the model stops its workers
    run(sampler_mod, model, cfg=5.0, gpus=2)     # the sampler starts 1 worker
    pool = multi.active_pool()
    chunks.clear()
    (shared,) = decode(vae=vae, samples=samples)
    assert torch.equal(shared, alone) and chunks == [(1, 1)]  # this process decoded one chunk of two
    assert set(pool.last_fingerprints) == {0, 1} and len(set(pool.last_fingerprints.values())) == 1
    chunks.clear()
    (off,) = decode(vae=vae, samples=samples, use_gpu_workers=False)
    assert torch.equal(off, alone) and chunks == [(1, 2), (2, 2)]
    # a worker failing in the decode: the frames still come, decoded here alone
    def died(*args, **kwargs):
        raise multi.WorkerError("planted: worker 1 died")

    monkeypatch.setattr(pool, "run_job", died)
    chunks.clear()
    (fallback,) = decode(vae=vae, samples=samples)
    assert torch.equal(fallback, alone) and chunks == [(1, 2), (2, 2)]
