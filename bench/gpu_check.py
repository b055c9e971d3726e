"""One command that proves the pack's GPU paths: compute kernels, block streaming, the planner, VAE and text.

    python bench/gpu_check.py [--out DIR] [--quick] [--device cuda|cpu] [--tiny] [--only SECTION,...]

One process, no model download: it builds the real-width architecture with random weights
(4 DiT blocks of width 6144 with the real non-block layers, the full-size VAE, a few Step-LLM
layers of width 6144) through the pack's own builders and measures

1. compute: one block forward at 18,972 and 75,888 tokens (544x992x51 and x204), bf16 SDPA,
   SageAttention / flash-attn when installed, fp8 ``_scaled_mm`` and fp8 dequantise: time,
   TFLOP/s, error against bf16 SDPA, peak in hidden-state copies;
2. streaming: a model call over the blocks all resident vs all streamed (BlockStreamer:
   pinned homes, copy stream, prefetch): time ratio, copy time hidden, bit-identity, host RSS;
3. planner: predicted peak (``estimate_peak``) vs ``torch.cuda.max_memory_allocated`` over a
   grid (51/204 frames, bf16/fp8, blocks 0/some/all, CFG batched or not), scaled to 48 blocks;
4. VAE decode of one 544x992 chunk (time, peak) and Step-LLM layer streaming vs resident;
5. environment: GPU, driver, CUDA, torch, optional backends, what "auto" attention picks,
   whether fp8 matmul runs.

Prints a time estimate first, a table per section as it finishes, and writes
``gpu_check.json`` and ``gpu_check.md`` to ``--out`` after every row (default
``out/gpu_check-<time>/``, git-ignored), so a run stopped by a timeout leaves its results.
Exit 0: every check passed; 1: a check failed or a section raised; 2: no usable device
(without CUDA it says so; ``--device cpu --tiny`` rehearses every section on a CPU at tiny widths).
How to read the rows and what to change when one fails: docs/gpu_check.md.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before torch: the startup time is reported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

import gpu_check_lib as lib  # noqa: E402
from stepvideo_core import attention as attn  # noqa: E402
from stepvideo_core import fp8  # noqa: E402
from stepvideo_core.compile import CompileSettings, compiled_blocks  # noqa: E402
from stepvideo_core.dit import build_transformer  # noqa: E402
from stepvideo_core.dit.blocks import StepVideoBlock  # noqa: E402
from stepvideo_core.dit.loader import FP8_PREFIX  # noqa: E402
from stepvideo_core.offload import BlockStreamer  # noqa: E402
from stepvideo_core.offload.planner import (CLIP_TOKENS, LLM_TOKENS, PlanInputs, estimate_peak,  # noqa: E402
                                            weight_bytes)
from stepvideo_core.text.step_llm import build_step_llm  # noqa: E402
from stepvideo_core.text.streaming import DEFAULT_HEADROOM, run_step_llm, stream_bytes  # noqa: E402
from stepvideo_core.vae import build_vae  # noqa: E402

BF16 = torch.bfloat16
NEEDS_GPU = ("gpu_check needs a CUDA GPU: this torch ({torch}, CUDA {cuda}) sees none. "
             "It measures the CUDA paths (copy-stream streaming, fp8 _scaled_mm, SageAttention/flash-attn, "
             "real peaks) at real widths. To rehearse every section on this CPU at tiny widths, run:\n"
             "    python bench/gpu_check.py --device cpu --tiny")
NEEDS_TINY = ("gpu_check --device cpu builds the real widths (4 DiT blocks of 6144, the full VAE), which would "
              "take hours on a CPU; add --tiny:\n    python bench/gpu_check.py --device cpu --tiny")


def gib(n) -> str:
    """Bytes with their unit: GiB from 1 GiB up, MiB below (tiny widths)."""
    if n is None:
        return "n/a"
    return f"{n / lib.GiB:.2f} GiB" if abs(n) >= lib.GiB else f"{n / lib.MiB:.1f} MiB"


def ms(s) -> str:
    return "n/a" if s is None else f"{s * 1e3:.1f} ms"


# --------------------------------------------------------------------------- device timers


class _Box:
    """What a timer's context manager fills in on exit (``seconds``, ``peak``...)."""

    def __init__(self):
        self.seconds = None
        self.peak = None
        self.reserved_peak = None
        self.level = lambda: None


def _live_bytes():
    """The test suite's live-tensor counter (the tool that measured the planner's constants), or None."""
    try:
        from tests.core.offload.livebytes import LiveBytes
    except ImportError:
        return None
    return LiveBytes()


class CpuTimer:
    """Wall-clock intervals (``perf_counter``) and peaks of the tensors created in a scope.

    Peaks come from ``tests/core/offload/livebytes.py`` (every aten output's storage, from its
    creation until it is freed): the same measurement test_planner.py checks the planner with.
    Weights that stay where they are (CPU home = CPU device) are not in it.
    """

    kind = "cpu"

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        pass

    @contextlib.contextmanager
    def interval(self):
        box = _Box()
        start = time.perf_counter()
        yield box
        box.seconds = time.perf_counter() - start

    def allocated(self):
        return None

    @contextlib.contextmanager
    def memory(self, ignore=()):
        box = _Box()
        counter = _live_bytes()
        if counter is None:
            yield box
            return
        counter.ignore(*ignore)
        box.level = lambda: counter.current
        with counter:
            yield box
        box.peak = counter.peak

    def cleanup(self, full: bool = False) -> None:
        """Free what the last row left (``full``: also collect reference cycles, which is slow)."""
        if full:
            gc.collect()


class CudaTimer:
    """CUDA events for intervals, ``max_memory_allocated`` above the scope's start for peaks."""

    kind = "cuda"

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def interval(self):
        box = _Box()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield box
        end.record()
        end.synchronize()
        box.seconds = start.elapsed_time(end) / 1e3

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    @contextlib.contextmanager
    def memory(self, ignore=()):
        box = _Box()
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        box.level = lambda: torch.cuda.memory_allocated(self.device) - base
        yield box
        self.sync()
        box.peak = torch.cuda.max_memory_allocated(self.device) - base
        box.reserved_peak = torch.cuda.max_memory_reserved(self.device) - reserved

    def cleanup(self, full: bool = False) -> None:
        """Hand cached device memory back (``full``: collect reference cycles first, which is slow)."""
        if full:
            gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


def repeat(timer, fn, runs: int, warmup: int = 1):
    """(seconds of each of ``runs`` timed calls after ``warmup`` untimed ones, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        del out
        with timer.interval() as t:
            out = fn()
        times.append(t.seconds)
    return times, out


# --------------------------------------------------------------------------- models with random weights


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place on the module's own device (GPU-fast), scaled like
    ``stepvideo_core.tiny.random_state_dict`` scales them (which draws on the CPU only):
    norm weights 1 + 0.1 r, other vectors 0.05 r, modulation tables r / sqrt(D), matrices r / sqrt(fan_in)."""
    named = sorted(list(module.named_parameters()) + list(module.named_buffers()), key=lambda kv: kv[0])
    for i, (name, tensor) in enumerate(named):
        gen = torch.Generator(device=tensor.device).manual_seed(seed * 1_000_003 + i)
        r = torch.randn(tuple(tensor.shape), generator=gen, device=tensor.device, dtype=torch.float32)
        shape = tuple(tensor.shape)
        if "norm" in name and name.endswith(".weight") and len(shape) == 1:
            r.mul_(0.1).add_(1.0)
        elif len(shape) <= 1:
            r.mul_(0.05)
        elif "scale_shift_table" in name:
            r.div_(shape[-1] ** 0.5)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            r.div_(fan_in ** 0.5)
        tensor.data.copy_(r)
        del r


def _build_random(builder, device: torch.device, seed: int = 0, home=None):
    """``builder()`` (a meta-device model) with random weights made on ``device``, then moved to ``home``."""
    with torch.inference_mode(False), torch.no_grad():
        model = builder().to_empty(device=device)
        randomize_(model, seed)
        if home is not None and torch.device(home) != device:
            model.to(home)
    return model


def quantize_linears_(module: torch.nn.Module, prefix: str, home: torch.device, work: torch.device) -> int:
    """Turn the ScaledFp8Linear layers under ``prefix`` into scaled fp8 (quantised on ``work``, stored on ``home``),
    the way the loader does for a full-precision file (``quantize_on_load`` + ``take_tensor``)."""
    count = 0
    with torch.inference_mode(False), torch.no_grad():
        for layer in fp8.fp8_layers(module, prefix).values():
            layer.quantize_on_load = True
            layer.take_tensor("weight", layer.weight.data.to(work), home)
            count += 1
    return count


def copy_block(block: torch.nn.Module, device: torch.device, operations=None) -> StepVideoBlock:
    """A device copy of a DiT block (``operations`` fp8.scaled_fp8 gives fp8-capable Linears)."""
    with torch.inference_mode(False), torch.no_grad():
        kw = {} if operations is None else dict(operations=operations)
        new = StepVideoBlock(block.dim, block.attn1.head_dim, device="meta", dtype=BF16, **kw).to_empty(device=device)
        new.load_state_dict(block.state_dict())
    return new.eval()


@contextlib.contextmanager
def non_block_on(model: torch.nn.Module, device: torch.device):
    """Within the block, the model's non-block weights live on ``device`` (then back home)."""
    homes = []
    try:
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not name.startswith(FP8_PREFIX) and tensor.device != device:
                homes.append((tensor, tensor.data))
                tensor.data = tensor.data.to(device)
        yield
    finally:
        for tensor, home in homes:
            tensor.data = home


class _Captured(Exception):
    pass


def block_inputs(model, inputs: dict, device: torch.device) -> tuple:
    """(x, context, t6, rope, mask, backend) exactly as the model hands them to its first block."""
    def stop(_module, args):
        raise _Captured(args)

    handle = model.transformer_blocks[0].register_forward_pre_hook(stop)
    try:
        with non_block_on(model, device):
            model(**inputs)
    except _Captured as captured:
        return captured.args[0]
    finally:
        handle.remove()
    raise RuntimeError("the model never reached its first block")


def dit_inputs(model, size: tuple, batch: int, device: torch.device, seed: int = 0) -> dict:
    """Sampler-like model inputs on ``device``: bf16 latents and text states, all 397 context tokens valid.

    The mask is fp32 so that its sum is exactly 397 (bf16 rounds integers above 256; see the
    reference's note on the official pipeline), so every block sees the full context the FLOP
    formula counts.
    """
    width, height, frames = size
    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(BF16)

    inputs = dict(hidden_states=randn(batch, frames // 17 * 3, cfg.in_channels, height // 16, width // 16),
                  timestep=torch.full((batch,), 0.5, device=device, dtype=BF16),
                  encoder_hidden_states=randn(batch, LLM_TOKENS, cfg.caption_dim),
                  encoder_attention_mask=torch.ones(batch, CLIP_TOKENS + LLM_TOKENS, device=device))
    if cfg.clip_dim:
        inputs["encoder_hidden_states_2"] = randn(batch, CLIP_TOKENS, cfg.clip_dim)
    return inputs


def rel_err(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor = None) -> float:
    """||a - b|| / ||b - base|| (``base`` None: / ||b||) in fp64 sums over fp32 chunks of the token axis
    (a 75,888-token block output is 0.9 GB in bf16; whole fp32 copies would be 4x that, each)."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    base = None if base is None else base.reshape(-1, base.shape[-1])
    num = den = 0.0
    for start in range(0, a.shape[0], 8192):
        part = slice(start, start + 8192)
        ref = b[part].float()
        num += float((a[part].float() - ref).pow(2).sum(dtype=torch.float64))
        if base is not None:
            ref = ref - base[part].float()
        den += float(ref.pow(2).sum(dtype=torch.float64))
    return (num / den) ** 0.5 if den > 0 else float("inf")


def tensors_of(*modules) -> list:
    return [t for m in modules for t in list(m.parameters()) + list(m.buffers())]


def rss_bytes():
    """Resident set size of this process (bytes), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - RSS is optional
        return None


_ROUTES: list = []


def pack_routes():
    """``nodes/routes.py`` (the plan route's time model), imported with the pack as ComfyUI imports it; or None."""
    if not _ROUTES:
        name = "stepvideo_pack_gpu_check"
        try:
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                              submodule_search_locations=[str(ROOT)])
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            _ROUTES.append(sys.modules[f"{name}.nodes.routes"])
        except Exception as exc:  # noqa: BLE001 - only an annotation is lost
            _ROUTES.append(exc)
    return None if isinstance(_ROUTES[0], Exception) else _ROUTES[0]


# --------------------------------------------------------------------------- the run


class Terminated(BaseException):
    """SIGTERM (e.g. from ``timeout``): the files are written and the run stops."""


class Bench:
    """One run: the spec, the device, the timer, the report and the lazily built models."""

    def __init__(self, spec: lib.Spec, device: torch.device, timer, out: Path, report: dict):
        self.spec, self.device, self.timer, self.out, self.report = spec, device, timer, out, report
        self.section = None
        self._models: dict = {}
        self._last = time.perf_counter()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def stream_mode(self) -> str:
        """"auto" (= the "cuda" transport) on CUDA; "copy" on the CPU, so the slots really are filled."""
        return "auto" if self.cuda else "copy"

    # -- models ----------------------------------------------------------------------
    def dit(self):
        """The DiT with ``spec.layers`` real-width blocks, bf16, random, resting on the CPU."""
        if "dit" not in self._models:
            model = _build_random(lambda: build_transformer(self.spec.dit_config, device="meta", dtype=BF16),
                                  self.device, home="cpu")
            self.timer.cleanup()
            self._models["dit"] = model
        return self._models["dit"]

    def dit_fp8(self):
        """The same weights with the blocks' Linears in scaled fp8 (quantised on the device), on the CPU."""
        if "dit_fp8" not in self._models:
            source = self.dit()
            with torch.inference_mode(False), torch.no_grad():
                model = build_transformer(self.spec.dit_config, device="meta", dtype=BF16,
                                          operations=fp8.scaled_fp8).to_empty(device="cpu")
                model.load_state_dict(source.state_dict())
            quantize_linears_(model, FP8_PREFIX, torch.device("cpu"), self.device)
            self.timer.cleanup()
            self._models["dit_fp8"] = model
        return self._models["dit_fp8"]

    # -- report ----------------------------------------------------------------------
    def add(self, row: dict) -> dict:
        now = time.perf_counter()
        row["seconds"] = round(now - self._last, 3)  # since the previous row: where the time went
        self._last = now
        self.report["sections"][self.section]["rows"].append(row)
        self.write()
        return row

    def row(self, name: str, status: str, result: str, check: str = "", **values) -> dict:
        return self.add(lib.row(self.section, name, status, result, check, **values))

    @contextlib.contextmanager
    def guard(self, name: str):
        """A row that raises is reported as an error row; the section goes on."""
        failed = False
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported, then the next row runs
            self.row(name, "error", f"{type(exc).__name__}: {exc}"[:400], traceback=traceback.format_exc())
            failed = True
        if failed:  # out of the handler: the exception's frames (and their tensors) are gone
            self.timer.cleanup(full=True)

    def write(self) -> None:
        write_files(self.out, self.report)

    def run_section(self, name: str, fn) -> None:
        self.section = name
        est = (self.report.get("estimate") or {}).get("sections", {}).get(name, {}).get("seconds")
        entry = {"status": "running", "rows": [], "seconds": None, "estimate_s": est}
        self.report["sections"][name] = entry
        self.write()
        start = self._last = time.perf_counter()
        try:
            with torch.inference_mode():
                fn(self)
            entry["status"] = "done"
        except Terminated:
            entry["status"] = "error"
            entry["rows"].append(lib.row(name, f"{name}: terminated", "error", "stopped by SIGTERM (timeout?)"))
            raise
        except Exception as exc:  # noqa: BLE001 - a broken section must not stop the others
            entry["status"] = "error"
            entry["traceback"] = traceback.format_exc()
            entry["rows"].append(lib.row(name, f"{name}: exception", "error", f"{type(exc).__name__}: {exc}"[:400]))
        finally:
            entry["seconds"] = time.perf_counter() - start
            try:
                self.timer.cleanup(full=True)
            except Exception:  # noqa: BLE001
                pass
            self.write()
            print(lib.render_section_text(name, entry), flush=True)


def write_files(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, each replaced atomically (a kill leaves the previous complete file)."""
    for filename, text in (("gpu_check.json", lib.to_json(report)), ("gpu_check.md", lib.render_markdown(report))):
        tmp = out / (filename + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / filename)


# --------------------------------------------------------------------------- 5. environment


def _version(*names):
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _nvidia_smi() -> dict:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,pcie.link.gen.max,"
                               "pcie.link.width.max", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=15)
        fields = [f.strip() for f in done.stdout.strip().splitlines()[0].split(",")]
        return dict(zip(("driver", "name", "max_sm_clock", "pcie_gen", "pcie_width"), fields))
    except Exception as exc:  # noqa: BLE001 - optional
        return {"error": f"{type(exc).__name__}: {exc}"}


def section_environment(bench: Bench) -> None:
    dev = bench.device
    if bench.cuda:
        props = torch.cuda.get_device_properties(dev)
        cap = torch.cuda.get_device_capability(dev)
        free, total = torch.cuda.mem_get_info(dev)
        smi = _nvidia_smi()
        bench.row("GPU", "info", f"{props.name}, compute capability {cap[0]}.{cap[1]}, {props.multi_processor_count} "
                  f"SMs, {gib(total)} ({gib(free)} free)", name=props.name, capability=list(cap),
                  total_bytes=total, free_bytes=free, sms=props.multi_processor_count)
        bench.row("driver / CUDA / cuDNN", "info", f"driver {smi.get('driver', 'n/a')}, CUDA {torch.version.cuda}, "
                  f"cuDNN {torch.backends.cudnn.version()}, PCIe gen {smi.get('pcie_gen', '?')} "
                  f"x{smi.get('pcie_width', '?')}", smi=smi, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version())
        name = props.name
    else:
        bench.row("device", "info", f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads): a rehearsal, no GPU path is proven",
                  cores=os.cpu_count())
        name = None
    bench.row("torch / Python", "info", f"torch {torch.__version__}, Python {platform.python_version()}, "
              f"{platform.system()} {platform.release()}", torch=torch.__version__, python=platform.python_version())
    for label, dists, module in (("SageAttention", ("sageattention",), "sageattention"),
                                 ("flash-attn", ("flash-attn", "flash_attn"), "flash_attn")):
        version = _version(*dists)
        found = importlib.util.find_spec(module) is not None
        if version or found:
            bench.row(label, "info", f"installed, version {version or 'unknown'}", version=version)
        else:
            bench.row(label, "skip", "not installed", version=None)
    auto = attn.resolve_backend("auto", dev, BF16, masked=False)
    bench.row("attention 'auto' resolves to", "info",
              f"{auto} (available here: {', '.join(attn.available_backends(dev, BF16))})", backend=auto)
    supported = fp8.fp8_matmul_supported(dev)
    bench.row("fp8 matmul (_scaled_mm)", "info",
              "supported: fp8 weights multiply in fp8" if supported else
              "not supported: fp8 weights are dequantised (needs compute capability >= 8.9 and a row-wise kernel)",
              supported=supported)
    routes = pack_routes()
    if routes is None:
        bench.row("plan route time model", "skip", f"nodes/routes.py not importable: {_ROUTES[0]}"[:300])
    else:
        rate = routes.gpu_tflops(name)
        bench.row("plan route time model", "info",
                  (f"datasheet {rate:g} TFLOP/s bf16 x utilisation {routes.UTILISATION:g} = "
                   f"{rate * routes.UTILISATION:g} TFLOP/s assumed" if rate else
                   "this device is not in routes.GPU_BF16_TFLOPS: the route shows no time")
                  + f"; streamed blocks at {routes.HOST_TO_DEVICE_BYTES_PER_S / 1e9:g} GB/s",
                  datasheet_tflops=rate, utilisation=routes.UTILISATION,
                  h2d_bytes_per_s=routes.HOST_TO_DEVICE_BYTES_PER_S)
    memtotal = None
    try:
        import psutil

        memtotal = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001
        pass
    bench.row("host", "info", f"{os.cpu_count()} cores, {gib(memtotal)} RAM, RSS now {gib(rss_bytes())}",
              ram_bytes=memtotal)


# --------------------------------------------------------------------------- 1. compute


def section_compute(bench: Bench) -> None:
    spec, dev, timer = bench.spec, bench.device, bench.timer
    model = bench.dit()
    dim = spec.dim
    routes = pack_routes()
    assumed = None
    if routes is not None and bench.cuda:
        rate = routes.gpu_tflops(torch.cuda.get_device_name(dev))
        assumed = rate * routes.UTILISATION if rate else None
    for size in spec.compute_sizes:
        tokens = lib.tokens_of(size)
        label = f"{tokens:,} tok"
        flops = lib.block_flops(tokens, dim)["total"]
        unit = lib.hidden_unit(tokens, dim)
        x = context = t6 = rope = mask = blocks = ref = None
        with bench.guard(f"block {label}: inputs"):
            x, context, t6, rope, mask, _ = block_inputs(model, dit_inputs(model, size, 1, dev), dev)
            blocks = {"bf16": copy_block(model.transformer_blocks[0], dev)}
            blocks["fp8"] = copy_block(model.transformer_blocks[0], dev, operations=fp8.scaled_fp8)
            quantize_linears_(blocks["fp8"], "", dev, dev)
        if blocks is None:
            continue
        fixed = [x, context, t6, *rope, mask]
        ref_s = None
        for backend, kind in lib.COMPUTE_VARIANTS:
            name = f"block {label}: {backend if kind == 'bf16' else kind}"
            with bench.guard(name):
                if kind == "bf16":
                    reason = attn.backend_unavailable_reason(backend, dev, BF16)
                    if reason is not None:
                        bench.row(name, "skip", "not installed" if "not installed" in reason else reason)
                        continue
                    block = blocks["bf16"]
                    bound = lib.ATTENTION_BOUNDS[backend]
                    planner_units = lib.planner_block_peak(tokens, dim, "bf16", backend) / unit
                else:
                    mode = kind.split()[1]
                    if mode == "matmul" and not fp8.fp8_matmul_supported(dev):
                        bench.row(name, "skip", "fp8 matmul not supported on this device (the dequantise row runs)")
                        continue
                    block = blocks["fp8"]
                    fp8.set_matmul_mode(block, mode)
                    bound = lib.FP8_BOUNDS[mode]
                    planner_units = lib.planner_block_peak(tokens, dim, "fp8_scaled", backend) / unit
                if ref is None and not (backend == "sdpa" and kind == "bf16"):
                    bench.row(name, "skip", "no bf16 SDPA reference (its row failed)")
                    continue
                with timer.memory(ignore=tensors_of(block) + fixed) as mem:
                    times, out = repeat(timer, lambda: block(x, context, t6, rope, mask, backend), spec.compute_runs)
                seconds = lib.median(times)
                rate = lib.tflops(flops, seconds)
                units = None if mem.peak is None else (mem.peak + unit) / unit
                peak_note = "" if units is None else f", peak {units:.2f} U (planner {planner_units:.2f} U)"
                values = dict(tokens=tokens, seconds=seconds, times=times, flops=flops, tflops=rate,
                              peak_bytes=mem.peak, peak_units=units, planner_units=planner_units)
                if ref is None:  # the bf16 SDPA reference
                    ref, ref_s = out, seconds
                    finite = bool(torch.isfinite(out).all())
                    note = "" if assumed is None else f"; the plan route assumes {assumed:.0f} TFLOP/s"
                    status = "info" if finite else "warn"
                    bench.row(name, status, f"{ms(seconds)}, {rate:.3g} TFLOP/s{peak_note}{note}"
                              + ("" if finite else "; OUTPUT NOT FINITE (random weights)"),
                              "reference", finite=finite, route_assumed_tflops=assumed, **values)
                else:
                    err = rel_err(out, ref)
                    update = rel_err(out, ref, base=x)  # of the block's own contribution out - x
                    status = lib.error_check(err, bound)
                    bench.row(name, status, f"{ms(seconds)} ({ref_s / seconds:.2f}x SDPA), {rate:.3g} TFLOP/s, "
                              f"error {err:.4f} (of the block's update: {update:.4f}){peak_note}",
                              f"error <= {bound:g}", error=err, update_error=update, bound=bound,
                              speedup=ref_s / seconds, **values)
                if units is not None and units > 1.1 * planner_units:
                    bench.row(f"{name}: peak", "warn", f"{units:.2f} hidden-state copies at the block's peak, "
                              f"the planner assumes {planner_units:.2f} (fp8: with its workspace)",
                              "peak <= 1.1 x planner units",
                              peak_units=units, planner_units=planner_units)
                del out
        if size is spec.compute_sizes[0] and ref is not None:
            compiled_block_rows(bench, label, blocks, (x, context, t6, rope, mask), ref, ref_s, flops)
        x = context = t6 = rope = mask = blocks = ref = fixed = None  # (closures above read these names)
        timer.cleanup()


class _OneBlock(torch.nn.Module):
    """A model holding one block as ``transformer_blocks[0]``: what :func:`compiled_blocks` takes."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([block])


def compiled_block_rows(bench: Bench, label: str, blocks: dict, inputs: tuple, ref, ref_s: float, flops: float) -> None:
    """``block <size>: compiled <kind>``: the block through :func:`stepvideo_core.compile.compiled_blocks` (inductor).

    One eager call (each block's first call is eager), the call that compiles (its time less a compiled
    call's is the compile time), then the timed calls; the error is against the eager bf16 SDPA reference.
    Checks: one graph for the block (no graph break, no recompile) and the error bound of
    ``lib.COMPILE_BOUNDS``; a compile that fails (no Triton, fp8 kernels the GPU lacks) is a ``warn`` row
    with the fallback's cause: users then run eagerly, as the row says.
    """
    spec, dev, timer = bench.spec, bench.device, bench.timer
    for kind in spec.compile_variants:
        name = f"block {label}: compiled {kind}"
        with bench.guard(name):
            block = blocks["bf16" if kind == "bf16" else "fp8"]
            if kind == "fp8 matmul":
                if not fp8.fp8_matmul_supported(dev):
                    bench.row(name, "skip", "fp8 matmul not supported on this device")
                    continue
                fp8.set_matmul_mode(block, "matmul")
            call = lambda: block(*inputs, "sdpa")  # noqa: E731
            try:
                with compiled_blocks(_OneBlock(block), CompileSettings(mode="blocks"), device=dev) as state:
                    call()                                              # eager: the block's first call
                    with timer.interval() as first:
                        out = call()                                    # compiles
                    times, out = repeat(timer, call, spec.compute_runs, warmup=0)
            finally:
                if kind == "fp8 matmul":
                    fp8.set_matmul_mode(block, "auto")
            seconds = lib.median(times)
            compile_s = max(0.0, first.seconds - seconds)
            values = dict(seconds=seconds, times=times, compile_seconds=compile_s, graphs=state.graphs,
                          compiled_calls=state.compiled_calls, fallback=state.fallback, flops=flops,
                          tflops=lib.tflops(flops, seconds))
            if state.fallback is not None:
                bench.row(name, "warn", f"compile failed, ran eagerly: {state.fallback}", "compiles", **values)
                continue
            err = rel_err(out, ref)
            bound = lib.COMPILE_BOUNDS[kind]
            status = lib.error_check(err, bound) if state.graphs == 1 else "FAIL"
            bench.row(name, status, f"{ms(seconds)} ({ref_s / seconds:.2f}x eager bf16 SDPA), "
                      f"{lib.tflops(flops, seconds):.3g} TFLOP/s, compile {compile_s:.1f} s, {state.graphs} graph"
                      f"{'s' if state.graphs != 1 else ''}, error {err:.4f}",
                      f"1 graph, error <= {bound:g}", error=err, bound=bound, speedup=ref_s / seconds, **values)
            del out


# --------------------------------------------------------------------------- 2. streaming


def measure_copy(block, device: torch.device, timer) -> tuple:
    """(seconds to copy ``block``'s host tensors to ``device`` once, bytes, all pinned?) after one warm-up copy."""
    sources = tensors_of(block)
    targets = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in sources]
    seconds = None
    for _ in range(2):
        with timer.interval() as t:
            for dst, src in zip(targets, sources):
                dst.copy_(src, non_blocking=True)
        seconds = t.seconds
    pinned = all(s.is_pinned() for s in sources) if device.type == "cuda" else None
    return seconds, sum(s.numel() * s.element_size() for s in sources), pinned


def section_streaming(bench: Bench) -> None:
    spec, dev, timer = bench.spec, bench.device, bench.timer
    model = bench.dit()
    layers = spec.layers
    inputs = dit_inputs(model, spec.stream_size, spec.stream_batch, dev)
    tokens = lib.tokens_of(spec.stream_size)
    mode = bench.stream_mode

    with BlockStreamer(model, dev, None, mode=mode):
        warm = model(**inputs)
        resident_times = []
        resident_same = True
        for _ in range(spec.stream_passes):
            with timer.interval() as t:
                out = model(**inputs)
            resident_times.append(t.seconds)
            resident_same &= bool(torch.equal(out, warm))
    reference = warm
    timer.cleanup()

    timer.cleanup(full=True)
    rss = [rss_bytes()]
    first, steady, compared, identical = [], [], 0, 0
    for _ in range(spec.stream_runs):
        with BlockStreamer(model, dev, 0, mode=mode):
            for p in range(spec.stream_passes):
                with timer.interval() as t:
                    out = model(**inputs)
                (first if p == 0 else steady).append(t.seconds)
                compared += 1
                identical += bool(torch.equal(out, reference))
                del out
        timer.cleanup(full=True)
        rss.append(rss_bytes())

    copy_s, copy_bytes, pinned = measure_copy(model.transformer_blocks[0], dev, timer)
    rate = copy_bytes / copy_s / 1e9 if copy_s else None
    pin_status = "warn" if pinned is False else "info"
    bench.row("copy one block host->device", pin_status,
              f"{copy_bytes / 1e9:.2f} GB in {ms(copy_s)} = {lib.rate_note(rate)}"
              + ("" if pinned is None else (", pinned" if pinned else ", NOT pinned")),
              seconds=copy_s, bytes=copy_bytes, gb_per_s=rate, pinned=pinned)

    res, stream = lib.median(resident_times), lib.median(steady)
    copies = layers * copy_s if copy_s else None
    hidden = lib.hidden_fraction(res, stream, copies)
    flops = layers * lib.block_flops(tokens, spec.dim, spec.stream_batch)["total"]
    status = "warn" if bench.cuda and hidden is not None and hidden < 0.5 else "info"
    bench.row(f"{layers} blocks, {tokens:,} tok x {spec.stream_batch}: resident vs streamed", status,
              f"resident {ms(res)}, streamed {ms(stream)} per call ({stream / res:.2f}x); first call of a run "
              f"{ms(lib.median(first))}; copies {layers} x {ms(copy_s)} = {ms(copies)} per call, "
              + ("n/a" if hidden is None else f"{hidden:.0%}") + " hidden"
              + ("" if bench.cuda else " (CPU: synchronous copies by design)"),
              "" if not bench.cuda else "hidden >= 50 % (warn)",
              resident_s=res, streamed_s=stream, ratio=stream / res, first_call_s=lib.median(first),
              copy_per_call_s=copies, hidden_fraction=hidden, resident_times=resident_times,
              streamed_times=steady, first_times=first, tflops_resident=lib.tflops(flops, res))
    bench.row("resident repeat == resident", "ok" if resident_same else "warn",
              "bit-identical" if resident_same else "the resident baseline itself is not reproducible "
              "(non-deterministic kernels): the streamed comparison below cannot be exact",
              "torch.equal", identical=resident_same)
    bench.row("streamed == resident (bit-identical)", "ok" if identical == compared else "FAIL",
              f"identical in {identical} of {compared} calls over {spec.stream_runs} runs", "torch.equal, every call",
              identical=identical, compared=compared)
    status, growth = lib.rss_check(rss)
    pinned_bytes = layers * copy_bytes
    bench.row(f"host RSS over {spec.stream_runs} streamed runs", status,
              "n/a" if growth is None else
              (f"before {gib(rss[0])}, after runs " + " / ".join(gib(r) for r in rss[1:])
               + f": {growth / lib.MiB:+.0f} MiB from run 1 to run {spec.stream_runs} "
               f"(run 1: {(rss[1] - rss[0]) / lib.MiB:+.0f} MiB, {pinned_bytes / lib.MiB:.0f} MiB of blocks pinned)"),
              f"growth <= {lib.RSS_GROWTH_TOLERANCE // lib.MiB} MiB", rss=rss, growth=growth,
              streamed_bytes=pinned_bytes)


# --------------------------------------------------------------------------- 3. planner


def section_planner(bench: Bench) -> None:
    spec, dev, timer = bench.spec, bench.device, bench.timer
    width, height = spec.planner_size
    layers = spec.layers
    release_config = dict(spec.dit_config, num_layers=lib.RELEASE_LAYERS)
    for g in spec.planner_grid:
        fmt, frames = g["weight_format"], g["frames"]
        built = lib.blocks_for(g["blocks"], layers)
        release = lib.blocks_for(g["blocks"], lib.RELEASE_LAYERS)
        batch, calls = (2, 1) if g["batched"] else (1, 2)
        name = f"{frames}f {fmt} {release}/{lib.RELEASE_LAYERS} blocks, CFG {'batched' if g['batched'] else '1 by 1'}"
        with bench.guard(name):
            model = bench.dit_fp8() if fmt == "fp8_scaled" else bench.dit()
            block_bytes = fp8.weight_bytes(model.transformer_blocks[0])
            non_block = fp8.weight_bytes(model) - sum(fp8.weight_bytes(b) for b in model.transformer_blocks)
            inputs = dit_inputs(model, (width, height, frames), batch, dev)
            timer.cleanup()
            outs = []
            with timer.memory(ignore=tensors_of(model) + list(inputs.values())) as mem:
                with BlockStreamer(model, dev, built, mode=bench.stream_mode):
                    placed = mem.level()
                    for _ in range(calls):
                        outs.append(model(**inputs))  # kept like the sampler keeps v_cond for v_uncond
            del outs
            if mem.peak is None:
                bench.row(name, "skip", "no peak measurement on this device")
                continue
            # on the CPU the resident weights are the home tensors themselves: nothing was allocated for them
            unallocated = 0 if bench.cuda else non_block + built * block_bytes
            measured = mem.peak + unallocated
            weights = (placed or 0) + unallocated
            run = PlanInputs(width, height, frames, cfg_batch=batch, weight_format=fmt, attention="sdpa",
                             compute_dtype="bf16")
            est = estimate_peak(dataclasses.replace(run, blocks_on_device=built, config=spec.dit_config))
            est48 = estimate_peak(dataclasses.replace(run, blocks_on_device=release, config=release_config))
            measured48 = lib.scale_to_release(measured, built, release, block_bytes)
            status, ratio = lib.planner_check(est48["total"], measured48)
            items = est["items"]
            pred_act = items["activations"] + items["workspace"]
            meas_act = measured - weights
            act_ratio = pred_act / meas_act if meas_act > 0 else None
            reserved = "" if mem.reserved_peak is None else f"; reserved peak {gib(mem.reserved_peak)}"
            bench.row(name, status,
                      f"pred {gib(est48['total'])} / meas {gib(measured48)} = {ratio:.2f}; "
                      f"{built}/{layers} built: {gib(est['total'])} / {gib(measured)}; activations "
                      f"{gib(pred_act)} / {gib(meas_act)}" + ("" if act_ratio is None else f" = {act_ratio:.2f}")
                      + reserved,
                      f"pred >= {1 - lib.PLANNER_UNDERESTIMATE:g} x meas (48 blocks)",
                      frames=frames, weight_format=fmt, blocks_built=built, blocks_release=release,
                      cfg_batch=batch, calls=calls, predicted_release=est48["total"], measured_release=measured48,
                      ratio=ratio, predicted_built=est["total"], measured_built=measured, items_built=items,
                      weights_measured=weights, activations_predicted=pred_act, activations_measured=meas_act,
                      activation_ratio=act_ratio, block_bytes=block_bytes, planner_block_bytes=est["block_bytes"],
                      reserved_peak=mem.reserved_peak, reserve_predicted=est48["reserve"])
            if act_ratio is not None and act_ratio < 1 - lib.PLANNER_UNDERESTIMATE:
                bench.row(f"{name}: activations", "warn",
                          f"activation model {act_ratio:.2f} of measured (PEAK_UNITS / ATTENTION_EXTRA_UNITS)",
                          "activations pred >= 0.9 x meas", activation_ratio=act_ratio)
            del inputs
            timer.cleanup()


# --------------------------------------------------------------------------- 4. VAE and text


def section_vae_text(bench: Bench) -> None:
    spec, dev, timer = bench.spec, bench.device, bench.timer
    height, width = spec.vae_size
    with bench.guard(f"VAE decode one chunk {height}x{width}"):
        vae = _build_random(lambda: build_vae(spec.vae_config, device="meta", dtype=BF16), dev)
        z = vae.config.z_channels
        latents = torch.randn(1, 3, z, height // 16, width // 16, device=dev, generator=torch.Generator(
            device=dev).manual_seed(0), dtype=torch.float32).to(BF16)
        with timer.memory(ignore=tensors_of(vae) + [latents]) as mem:
            times, frames = repeat(timer, lambda: vae.decode_chunk(latents), spec.vae_runs)
        seconds = lib.median(times)
        flops = vae_decode_flops(spec)
        finite = bool(torch.isfinite(frames).all())
        rate = lib.tflops(flops, seconds) if flops else None
        bench.row(f"VAE decode one chunk {height}x{width}", "info" if finite else "warn",
                  f"{seconds:.2f} s" + ("" if rate is None else f", {rate:.3g} TFLOP/s")
                  + f", peak {gib(mem.peak)} above {gib(fp8.weight_bytes(vae))} of weights; "
                  f"output {list(frames.shape)}" + ("" if finite else ", NOT FINITE (random weights)"),
                  seconds=seconds, times=times, peak_bytes=mem.peak, reserved_peak=mem.reserved_peak,
                  weights_bytes=fp8.weight_bytes(vae), flops=flops, shape=list(frames.shape), finite=finite)
        vae = latents = frames = None
        timer.cleanup()

    cfg = spec.llm_config
    name = f"Step-LLM {cfg['num_layers']} layers x {cfg['hidden_size']}"
    with bench.guard(name):
        def builder():
            return build_step_llm(cfg, device="meta", dtype=BF16)

        llm_dev = _build_random(builder, dev)
        if bench.cuda:
            with torch.inference_mode(False), torch.no_grad():
                llm_host = builder().to_empty(device="cpu")
                llm_host.load_state_dict(llm_dev.state_dict())
        else:
            llm_host = llm_dev
        layers = cfg["num_layers"]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, cfg["padded_vocab_size"], (spec.llm_batch, spec.llm_tokens), generator=gen)
        ids[:, 0] = 1
        res_times, res_out = repeat(timer, lambda: run_step_llm(llm_dev, ids, dev, "resident"), spec.llm_runs)
        with timer.memory(ignore=tensors_of(llm_host, llm_dev)) as mem:
            str_times, str_out = repeat(timer, lambda: run_step_llm(llm_host, ids, dev, "stream"), spec.llm_runs)
        res, stream = lib.median(res_times) / layers, lib.median(str_times) / layers
        layer_bytes = fp8.weight_bytes(llm_host.layers[0])
        from stepvideo_core.text.step_llm import swiglu_width

        flops = lib.llm_layer_flops(spec.llm_tokens, spec.llm_batch, cfg["hidden_size"], cfg["num_attention_heads"],
                                    cfg["num_attention_groups"], swiglu_width(cfg["ffn_hidden_size"]))
        bench.row(f"{name}: resident", "info", f"{ms(res)} per layer, {lib.tflops(flops, res):.3g} TFLOP/s",
                  seconds_per_layer=res, times=res_times, flops_per_layer=flops)
        extra = stream - res
        rate = layer_bytes / extra / 1e9 if extra > 0 else None
        bench.row(f"{name}: streamed", "info",
                  f"{ms(stream)} per layer ({stream / res:.1f}x): {ms(extra)} to bring {layer_bytes / 1e9:.2f} GB = "
                  f"{lib.rate_note(rate)}" + (" (pageable copies)" if bench.cuda else " (CPU: no copy)"),
                  seconds_per_layer=stream, times=str_times, layer_bytes=layer_bytes, gb_per_s=rate)
        same = bool(torch.equal(res_out, str_out))
        bench.row(f"{name}: stream == resident", "ok" if same else "FAIL",
                  "bit-identical" if same else f"differ: relative error {rel_err(str_out, res_out):.2e}",
                  "torch.equal", identical=same)
        estimate = stream_bytes(llm_host, spec.llm_batch, spec.llm_tokens) - DEFAULT_HEADROOM
        status, ratio = lib.planner_check(estimate, mem.peak)
        bench.row(f"{name}: stream peak vs estimate", status,
                  "n/a" if ratio is None else
                  f"estimate {gib(estimate)} / measured {gib(mem.peak)} = {ratio:.2f} "
                  f"(text.streaming.stream_bytes without its {gib(DEFAULT_HEADROOM)} headroom)",
                  f"estimate >= {1 - lib.PLANNER_UNDERESTIMATE:g} x measured", estimate=estimate,
                  measured=mem.peak, ratio=ratio)
        llm_dev = llm_host = res_out = str_out = None


_VAE_FLOPS: dict = {}


def vae_decode_flops(spec: lib.Spec):
    """FLOPs of one chunk's decode, counted by torch's FlopCounterMode on the meta device (no memory, ~1 s)."""
    key = (repr(spec.vae_config), spec.vae_size)
    if key not in _VAE_FLOPS:
        try:
            from torch.utils.flop_counter import FlopCounterMode

            vae = build_vae(spec.vae_config, device="meta", dtype=BF16)
            height, width = spec.vae_size
            z = torch.empty(1, vae.config.z_channels, 3, height // 16, width // 16, device="meta", dtype=BF16)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                vae.decoder(z)
            _VAE_FLOPS[key] = int(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - only the estimate and a TFLOP/s figure need it
            _VAE_FLOPS[key] = None
    return _VAE_FLOPS[key]


def estimate_sizes(spec: lib.Spec) -> dict:
    """Weight sizes the time estimate needs, from the planner's formulas and meta-device models."""
    bf16 = weight_bytes("bf16", config=spec.dit_config)
    fp8_sizes = weight_bytes("fp8_scaled", "bf16", config=spec.dit_config)
    llm = build_step_llm(spec.llm_config, device="meta", dtype=BF16)
    vae = build_vae(spec.vae_config, device="meta", dtype=BF16)
    return dict(block_bytes=bf16["block"], fp8_block_bytes=fp8_sizes["block"], non_block_bytes=bf16["non_block"],
                llm_layer_bytes=fp8.weight_bytes(llm.layers[0]), vae_bytes=fp8.weight_bytes(vae))


def runnable_variants(device: torch.device) -> int:
    """How many of the compute variants can run here (the estimate counts only those)."""
    count = 0
    for backend, kind in lib.COMPUTE_VARIANTS:
        if kind == "bf16":
            count += attn.backend_unavailable_reason(backend, device, BF16) is None
        elif kind == "fp8 matmul":
            count += bool(fp8.fp8_matmul_supported(device))
        else:
            count += 1
    return count


SECTION_FUNCS = {"environment": section_environment, "compute": section_compute, "streaming": section_streaming,
                 "planner": section_planner, "vae_text": section_vae_text}


# --------------------------------------------------------------------------- CLI


TINY_FP8_CHUNK = 16384  # elements: about 1/100 of a tiny FFN input, as 2^24 is of a real one (test_planner.py: 4096)


def tiny_settings(device: torch.device):
    """Settings that make tiny widths behave like real ones.

    * fp8 quantises in row chunks of 2^24 elements (64 MB of fp32), tiny next to real activations
      (GBs) but larger than a whole tiny tensor; at tiny widths the chunk is cut to
      :data:`TINY_FP8_CHUNK` so that it is again small relative to the tensors, as the planner
      test does.
    * On the CPU, one intra-op thread: tiny matmuls are no faster on more, and far faster when
      other processes share the cores.

    Returns a function that restores both (the test suite runs the check in-process).
    """
    chunk, threads = fp8._CHUNK_ELEMENTS, torch.get_num_threads()
    fp8._CHUNK_ELEMENTS = TINY_FP8_CHUNK
    if device.type == "cpu":
        torch.set_num_threads(1)

    def restore() -> None:
        fp8._CHUNK_ELEMENTS = chunk
        torch.set_num_threads(threads)

    return restore


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.json / gpu_check.md (default out/gpu_check-<time>/)")
    parser.add_argument("--quick", action="store_true", help="smaller grid and fewer repeats (<= 3 min on a H100/H200)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny widths (the test configs of stepvideo_core.tiny)")
    parser.add_argument("--only", help=f"comma-separated sections to run, of {','.join(lib.SECTIONS)}")
    parser.add_argument("--estimate", action="store_true",
                        help="print the time estimate of this mode and exit (needs no device)")
    args = parser.parse_args(argv)
    if args.only:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in lib.SECTIONS]
        if unknown:
            parser.error(f"unknown section(s) {unknown}; choose from {list(lib.SECTIONS)}")
        args.only = chosen
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate:
        spec = lib.make_spec(args.tiny, args.quick)
        print(f"mode {spec.name}")
        print(lib.format_estimate(lib.estimate(spec, estimate_sizes(spec), vae_decode_flops(spec))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NEEDS_GPU.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.tiny:
        print(NEEDS_TINY, file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    spec = lib.make_spec(args.tiny, args.quick)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "out" / f"gpu_check-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    timer = CudaTimer(device) if device.type == "cuda" else CpuTimer(device)
    restore = tiny_settings(device) if args.tiny else (lambda: None)
    try:
        return _run(args, argv, spec, device, timer, out)
    finally:
        restore()


def _run(args, argv, spec: lib.Spec, device: torch.device, timer, out: Path) -> int:
    gc.freeze()  # what exists now (modules, torch) is never garbage: later collections skip it
    try:
        return _run_sections(args, argv, spec, device, timer, out)
    finally:
        gc.unfreeze()


def _run_sections(args, argv, spec: lib.Spec, device: torch.device, timer, out: Path) -> int:
    sections = args.only or list(lib.SECTIONS)
    started = time.perf_counter()
    report = {"meta": {"command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
                       "mode": spec.name, "device": str(device), "started": datetime.datetime.now().isoformat(
                           timespec="seconds"), "startup_s": round(started - START, 1), "out": str(out)},
              "spec": spec.to_dict(), "estimate": None, "sections": {}}
    bench = Bench(spec, device, timer, out, report)
    est = lib.estimate(spec, estimate_sizes(spec), vae_decode_flops(spec), runnable_variants(device))
    report["estimate"] = est
    print(f"gpu_check: mode {spec.name} on {device}; sections {', '.join(sections)}; writing to {out}")
    print(lib.format_estimate(est), flush=True)
    if est["within_budget"] is False:
        print(f"WARNING: the estimate exceeds the {est['budget_s']:.0f} s budget", flush=True)
    bench.write()

    def terminate(signum, _frame):
        raise Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: no handler, the files are still written row by row
        previous = None
    try:
        for name in sections:
            bench.run_section(name, SECTION_FUNCS[name])
    except Terminated:
        print("gpu_check: terminated; the files hold the rows finished so far", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        report["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
        code = lib.exit_code(report)
        report["meta"]["exit_code"] = code
        report["failures"] = lib.failures(report)
        bench.write()
    print()
    print(lib.render_summary(report))
    print(f"files: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
