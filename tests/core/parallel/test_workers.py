"""WorkerPool: rank 0 here, GPU workers as spawned processes on the CPU (gloo), the tiny DiT from disk.

A pool run equals one process's ``sample`` (fp32, <= 1e-5 relative; a LoRA attached on every rank);
the workers stay up between runs; an interrupt on rank 0 stops every rank and the pool runs again;
a killed, failing or stalled worker gives a clear error within a bound and the next start is fresh;
a worker that cannot load fails the start with its message.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import time

import pytest
import torch
import torch.distributed as dist

from stepvideo_core import load_transformer
from stepvideo_core.lora import LoraEntry, load_lora
from stepvideo_core.offload import SamplingInterrupted
from stepvideo_core.parallel import ParallelConfigError
from stepvideo_core.parallel import workers as W
from stepvideo_core.sampling import Placement, SamplingSettings, StepCache, sample
from stepvideo_core.tiny import write_tiny_dit, write_tiny_lora
from tests.core.parallel.pool_jobs import Beats
from tests.core.sampling.conftest import conditioning

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = dict(width=32, height=48, frames=17)          # 3 latent frames x 3 x 2 = 18 tokens
FAST = W.PoolSettings(collective_timeout_s=60.0, start_timeout_s=300.0, settle_timeout_s=20.0)
LOAD = W.LoadSettings(dtype=torch.float32, weight_format="auto", attention="sdpa")


def cpu(rank):
    return "cpu"


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def inputs():
    pos, neg = conditioning(1, valid=5), conditioning(2, valid=2)
    for c in (pos, neg):
        c.pop("prompt")
    return pos, neg


def options(placement=Placement(), **kw):
    """``settings`` and ``placement`` of the runs here (sample's and SampleJob's keyword arguments)."""
    return dict(settings=SamplingSettings(**{**SIZE, "steps": 2, "cfg": 5.0, "shift": 17.0, "seed": 3, **kw}),
                placement=placement)


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("dit"))


@pytest.fixture(scope="module")
def model(dit_dir):
    return load_transformer(dit_dir, dtype=torch.float32)


_SHARED = []  # one process group per process: the module's pool, shut down while a test has its own


@pytest.fixture(scope="module")
def shared():
    yield _SHARED
    for p in _SHARED:
        p.shutdown()


@pytest.fixture
def pool(dit_dir, shared):
    """The module's pool (started on first use, and again after a test had a pool of its own)."""
    if not shared or shared[0].closed:
        shared[:] = [W.WorkerPool(FAST).start(dit_dir, LOAD, 2, cpu)]
    return shared[0]


@pytest.fixture
def fresh(dit_dir, shared):
    """Pools of its own for a test that breaks them (shut down afterwards in any case)."""
    for p in shared:
        p.shutdown()
    pools = []

    def make(settings=FAST, source=None):
        pools.append(W.WorkerPool(settings))
        return pools[-1].start(source or dit_dir, LOAD, 2, cpu)

    yield make
    for p in pools:
        p.shutdown()


def no_group():
    return not dist.is_initialized()


@pytest.mark.parametrize("mode", ["ulysses", "cfg"])
def test_a_pool_run_is_the_single_process_sample_and_the_workers_stay(pool, model, mode):
    """(CFG parallel with the memory plan's one-branch-at-a-time CFG: each rank computes one branch anyway.)"""
    pos, neg = inputs()
    pids = dict(pool.pids)
    out = pool.run_job(W.SampleJob(pos, neg, **options(Placement(batch_cfg=mode == "ulysses")), mode=mode,
                                      attention="sdpa"),
                          model)
    reference = sample(model, pos, neg, **options())
    assert out.shape == reference.shape and rel(out, reference) <= 1e-5
    assert pool.last_replies == {1: "done"}
    assert pool.last_fingerprints[1] == pool.last_fingerprints[0] == W.fingerprint(out)  # the same on every rank
    assert pool.last_layout.world == 2 and (pool.last_layout.cfg == 2) == (mode == "cfg")
    assert pool.pids == pids and pool.healthy()  # the same worker processes, still up


def test_a_lora_is_attached_on_every_rank(pool, model, tmp_path):
    path, _ = write_tiny_lora(tmp_path / "lora.safetensors", keys="kohya", alpha=2.0, seed=4)
    entry = LoraEntry(load_lora(path, model), strength=0.8, mode="on_the_fly")
    pos, neg = inputs()
    out = pool.run_job(W.SampleJob(pos, neg, **options(), mode="ulysses", adapters=(entry,)), model)
    from stepvideo_core.lora import attached

    with attached(model, (entry,)):
        reference = sample(model, pos, neg, **options())
    plain = sample(model, pos, neg, **options())
    assert rel(out, reference) <= 1e-5 and rel(plain, reference) > 1e-3  # the LoRA shows
    assert pool.last_fingerprints[1] == W.fingerprint(out)  # on every rank


def test_a_bad_layout_is_refused_before_any_worker_is_asked(pool, model):
    pos, _ = inputs()
    pids = dict(pool.pids)
    with pytest.raises(ParallelConfigError, match="CFG parallel needs guidance"):
        pool.run_job(W.SampleJob(pos, None, **options(cfg=1.0), mode="cfg"), model)
    assert pool.healthy() and pool.pids == pids
    assert pool.run_job(Beats(beats=2), model).tolist() == [0.0, 2.0]


def test_an_interrupt_on_rank_0_stops_every_worker_then_the_pool_runs_again(pool, model):
    pos, neg = inputs()
    pids = dict(pool.pids)
    steps = []
    job = W.SampleJob(pos, neg, **options(steps=6), mode="ulysses")
    with pytest.raises(SamplingInterrupted):
        pool.run_job(job, model, on_step=lambda i, n, x: steps.append(i), should_stop=lambda: bool(steps))
    assert steps == [1]
    assert pool.last_replies == {1: "interrupted"}  # the worker stopped too, and said so
    assert pool.healthy() and pool.pids == pids
    out = pool.run_job(W.SampleJob(pos, neg, **options(), mode="ulysses"), model)
    assert rel(out, sample(model, pos, neg, **options())) <= 1e-5


def test_one_process_group_at_a_time(pool, dit_dir):
    with pytest.raises(RuntimeError, match="already initialised"):
        W.WorkerPool(FAST).start(dit_dir, LOAD, 2, cpu)
    with pytest.raises(ValueError, match="at least 2"):
        W.WorkerPool(FAST).start(dit_dir, LOAD, 1, cpu)


def test_a_killed_worker_is_a_clear_error_then_a_fresh_start_works(fresh, model):
    pool = fresh()
    (pid,) = pool.pids.values()
    pos, neg = inputs()
    killed = []

    def kill_on_first_step(i, n, latents):
        if not killed:
            killed.append(i)
            os.kill(pid, signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(W.WorkerDied, match=rf"StepVideo: GPU worker 1 \(pid {pid}\) died \(exit code -9\) "
                                           r"during sampling"):
        pool.run_job(W.SampleJob(pos, neg, **options(steps=400), mode="ulysses"), model, on_step=kill_on_first_step)
    assert time.monotonic() - start < 30  # the watcher saw it: no collective timeout (60 s) waited out
    assert killed == [1] and not pool.healthy() and pool.closed and no_group()

    again = fresh()  # the next run starts fresh
    assert again.pids[1] != pid
    assert rel(again.run_job(W.SampleJob(pos, neg, **options(), mode="ulysses"), model),
               sample(model, pos, neg, **options())) <= 1e-5


def test_a_worker_that_dies_on_its_own_mid_run_is_named(fresh, model):
    pool = fresh()
    (pid,) = pool.pids.values()
    with pytest.raises(W.WorkerDied, match=rf"GPU worker 1 \(pid {pid}\) died \(exit code -9\)"):
        pool.run_job(Beats(beats=50, die=1, at=2), model)
    assert pool.closed and no_group()


def test_a_worker_exception_is_reported_with_its_message(fresh, model):
    pool = fresh()
    (pid,) = pool.pids.values()
    with pytest.raises(W.WorkerError, match=rf"GPU worker 1 \(pid {pid}\) failed during sampling: "
                                            r"RuntimeError: planted failure on rank 1"):
        pool.run_job(Beats(beats=50, fail=1, at=2), model)
    assert pool.closed and no_group()


def test_a_stalled_worker_ends_in_the_collective_timeout(fresh, model):
    pool = fresh(W.PoolSettings(collective_timeout_s=4.0, start_timeout_s=300.0, settle_timeout_s=2.0))
    start = time.monotonic()
    with pytest.raises(W.WorkerTimeout, match=r"timed out \(timeout 4 s, \$STEPVIDEO_PARALLEL_TIMEOUT\)"):
        pool.run_job(Beats(beats=50, stall=1, at=2), model)
    assert 3.5 < time.monotonic() - start < 40
    assert pool.closed and no_group()


def test_a_worker_that_cannot_load_the_model_fails_the_start(tmp_path, fresh):
    fresh().shutdown()  # (the module's pool is down now)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    pool = W.WorkerPool(FAST)
    with pytest.raises(W.WorkerStartError, match=r"GPU worker 1 \(pid \d+\) could not start: \w+"):
        pool.start(broken, LOAD, 2, cpu)
    assert pool.closed and not pool.pids and no_group()
    assert fresh().healthy()  # nothing left behind blocks the next pool


def test_shutdown_all_stops_every_live_pool_cleanly(fresh):
    """What atexit runs: each live pool's workers asked to stop, exiting with code 0, the group left."""
    pool = fresh()
    procs = [w.process for w in pool._workers]
    W.shutdown_all()
    assert pool.closed and [p.exitcode for p in procs] == [0] and no_group()
    pool.shutdown()  # again is fine


def test_settings_from_the_environment():
    assert W.PoolSettings.from_env({}).collective_timeout_s == 600.0
    got = W.PoolSettings.from_env({W.ENV_TIMEOUT: "12.5", W.ENV_START_TIMEOUT: "30"}, poll_s=0.2)
    assert (got.collective_timeout_s, got.start_timeout_s, got.poll_s) == (12.5, 30.0, 0.2)
    for bad in ("0", "-3", "ten", "inf", "nan"):
        with pytest.raises(ValueError, match=r"\$STEPVIDEO_PARALLEL_TIMEOUT must be a positive number"):
            W.PoolSettings.from_env({W.ENV_TIMEOUT: bad})


def test_a_job_may_not_set_what_each_rank_sets():
    with pytest.raises(ValueError, match=r"must not set \['device', 'on_step'\]"):
        W.SampleJob({}, None, options()["settings"], Placement(device="cpu"), {"on_step": print})


def test_pickles_name_the_workers_modules(pack):
    """Inside ComfyUI the pack's core has a mangled package name that a worker cannot import: the
    pickles sent to workers name ``stepvideo_core`` instead."""
    mangled = importlib.import_module(f"{pack.__name__}.stepvideo_core.parallel.workers")
    mangled_cache = importlib.import_module(f"{pack.__name__}.stepvideo_core.sampling.cache")
    mangled_settings = importlib.import_module(f"{pack.__name__}.stepvideo_core.sampling.settings")
    video = mangled_settings.SamplingSettings(32, 48, 17, steps=2, cfg=5.0, shift=17.0)
    job = mangled.SampleJob({"x": torch.ones(2)}, None, video,
                            options={"cache": mangled_cache.StepCache(mode="adaptive")})
    back = pickle.loads(mangled.dumps(job))
    assert type(back) is W.SampleJob and type(back.options["cache"]) is StepCache
    assert type(back.settings) is SamplingSettings and type(back.placement) is Placement
    assert torch.equal(back.positive["x"], torch.ones(2))
    assert pickle.loads(mangled.dumps(mangled.worker_main)) is W.worker_main
