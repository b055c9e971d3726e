"""bench/gpu_check.py without a GPU: every section end to end on the CPU at tiny widths, planted
failures, the no-GPU exit, and its FLOP / memory formulas against numbers worked out by hand."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_check_lib as lib  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def run_check(*args):
    """gpu_check.main(args) in this process: (exit code, stdout + stderr, report JSON or None)."""
    out_dir = None
    if "--out" in args:
        out_dir = Path(args[args.index("--out") + 1])
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = gpu_check.main(list(args))
    report = None
    if out_dir is not None and (out_dir / "gpu_check.json").exists():
        report = json.loads((out_dir / "gpu_check.json").read_text())
    return code, buffer.getvalue(), report


def cpu_fp8_matmul() -> bool:
    """The pack's own probe, asked with an empty cache (as tests/conftest.py asks it)."""
    from unittest import mock

    from stepvideo_core import fp8

    with mock.patch.dict(fp8._FP8_MATMUL_PROBED, clear=True):
        return fp8.fp8_matmul_supported(torch.device("cpu"))


def rows_of(report, section):
    return {r["name"]: r for r in report["sections"][section]["rows"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from stepvideo_core import fp8

    out = tmp_path_factory.mktemp("gc")
    before = (fp8._CHUNK_ELEMENTS, torch.get_num_threads())
    code, text, report = run_check("--device", "cpu", "--tiny", "--quick", "--out", str(out))
    after = (fp8._CHUNK_ELEMENTS, torch.get_num_threads())
    return code, text, report, (out / "gpu_check.md").read_text(), (before, after)


# --------------------------------------------------------------------------- end to end on the CPU


def test_cpu_tiny_run_passes_and_reports_every_section(tiny_run):
    code, text, report, markdown, _ = tiny_run
    assert code == 0, text
    assert "Time estimate at 400 TFLOP/s" in text and "result: ok (exit 0)" in text
    assert list(report["sections"]) == list(lib.SECTIONS)
    for name in lib.SECTIONS:
        section = report["sections"][name]
        assert section["status"] == "done" and section["rows"], name
        assert lib.SECTION_TITLES[name] in text and lib.SECTION_TITLES[name] in markdown
        assert section["estimate_s"] is not None and section["seconds"] is not None
    assert report["meta"]["exit_code"] == 0 and report["failures"] == []
    assert not [r for s in report["sections"].values() for r in s["rows"] if r["status"] in lib.FAILING]
    assert "**Result: ok**" in markdown and "| status | row | result | check |" in markdown


def test_cpu_tiny_run_has_the_rows_of_each_check(tiny_run):
    _, _, report, _, _ = tiny_run
    compute = rows_of(report, "compute")
    assert compute["block 96 tok: sdpa"]["status"] == "info"
    assert compute["block 96 tok: sageattention"]["result"] == "not installed"  # optional: skipped, not failed
    dequant = compute["block 192 tok: fp8 dequantize"]
    assert dequant["status"] == "ok" and 1e-4 < dequant["values"]["error"] <= lib.FP8_BOUNDS["dequantize"]
    assert dequant["values"]["flops"] == lib.block_flops(192, 256)["total"]
    matmul = compute["block 192 tok: fp8 matmul"]
    if cpu_fp8_matmul():
        assert matmul["status"] == "ok" and 1e-4 < matmul["values"]["error"] <= lib.FP8_BOUNDS["matmul"]
    else:  # torch 2.9: no CPU fp8 matmul with row-wise scales; the row says so instead of failing
        assert matmul["status"] == "skip" and "not supported" in matmul["result"]
    streaming = rows_of(report, "streaming")
    assert streaming["streamed == resident (bit-identical)"]["status"] == "ok"
    assert streaming["host RSS over 3 streamed runs"]["status"] == "ok"
    planner = report["sections"]["planner"]["rows"]
    assert len([r for r in planner if "ratio" in r["values"]]) == len(lib.make_spec(True, True).planner_grid)
    for r in planner:
        if "ratio" in r["values"]:
            v = r["values"]
            assert r["status"] == "ok" and v["ratio"] >= 0.9
            # the planner's per-block bytes are the real block's bytes (weights scale exactly)
            assert v["planner_block_bytes"] == v["block_bytes"]
            assert v["measured_release"] == v["measured_built"] + (v["blocks_release"] - v["blocks_built"]) * \
                v["block_bytes"]
    text_rows = rows_of(report, "vae_text")
    assert text_rows["Step-LLM 4 layers x 96: stream == resident"]["status"] == "ok"
    assert text_rows["VAE decode one chunk 64x64"]["values"]["shape"] == [1, 17, 3, 64, 64]
    env = rows_of(report, "environment")
    assert env["attention 'auto' resolves to"]["values"]["backend"] == "sdpa"
    assert env["fp8 matmul (_scaled_mm)"]["values"]["supported"] is cpu_fp8_matmul()


def test_cpu_tiny_run_compiles_one_block_graph_per_compiled_row(tiny_run):
    from tests.capabilities import require_inductor

    require_inductor()  # without a C++ compiler the rows are "warn: compile failed", which the run allows
    _, _, report, _, _ = tiny_run
    compute = rows_of(report, "compute")
    bf16 = compute["block 96 tok: compiled bf16"]
    assert bf16["status"] == "ok" and bf16["values"]["graphs"] == 1 and bf16["values"]["fallback"] is None
    assert 0 < bf16["values"]["error"] <= lib.COMPILE_BOUNDS["bf16"]
    matmul = compute["block 96 tok: compiled fp8 matmul"]
    if cpu_fp8_matmul():
        assert matmul["status"] == "ok" and matmul["values"]["graphs"] == 1
        assert 1e-4 < matmul["values"]["error"] <= lib.COMPILE_BOUNDS["fp8 matmul"]
    else:
        assert matmul["status"] == "skip"
    assert "block 192 tok: compiled bf16" not in compute             # the first size only: rows stay cheap


def test_tiny_settings_are_restored_after_a_run(tiny_run):
    """The tiny run cuts fp8's quantisation chunk and the CPU threads; both come back afterwards."""
    before, after = tiny_run[4]
    assert before == after and before[0] == 1 << 24


# --------------------------------------------------------------------------- planted failures


class DifferentStreamer(gpu_check.BlockStreamer):
    """A streamer whose streamed runs (blocks_on_device 0) return a slightly different velocity."""

    def __enter__(self):
        entered = super().__enter__()
        if self.blocks_on_device == 0:
            self._hooks.append(self.model.register_forward_hook(lambda module, args, out: out + 1e-3))
        return entered


def test_a_streamer_that_changes_the_output_fails_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "BlockStreamer", DifferentStreamer)
    code, text, report = run_check("--device", "cpu", "--tiny", "--quick", "--only", "streaming",
                                   "--out", str(tmp_path))
    assert code == 1
    row = rows_of(report, "streaming")["streamed == resident (bit-identical)"]
    assert row["status"] == "FAIL" and "identical in 0 of 6" in row["result"]
    assert "result: FAIL (exit 1)" in text and "streaming: streamed == resident (bit-identical)" in text
    assert report["failures"] == [f"streaming: streamed == resident (bit-identical): {row['result']}"]


def test_a_planner_that_underestimates_fails_the_run_naming_the_row(monkeypatch, tmp_path):
    real_spec, real_estimate = lib.make_spec, gpu_check.estimate_peak

    def one_row(tiny, quick):
        spec = real_spec(tiny, quick)
        spec.planner_grid = spec.planner_grid[:1]
        return spec

    def too_low(*args, **kwargs):
        est = real_estimate(*args, **kwargs)
        return dict(est, total=int(0.8 * est["total"]))

    monkeypatch.setattr(lib, "make_spec", one_row)
    monkeypatch.setattr(gpu_check, "estimate_peak", too_low)
    code, text, report = run_check("--device", "cpu", "--tiny", "--quick", "--only", "planner", "--out", str(tmp_path))
    assert code == 1
    name = "17f bf16 0/48 blocks, CFG batched"
    row = rows_of(report, "planner")[name]
    assert row["status"] == "FAIL" and row["values"]["ratio"] < 0.9
    assert f"planner: {name}" in text and name in (tmp_path / "gpu_check.md").read_text()


def test_a_section_that_raises_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(bench):
        raise RuntimeError("planted")

    monkeypatch.setitem(gpu_check.SECTION_FUNCS, "compute", broken)
    code, text, report = run_check("--device", "cpu", "--tiny", "--quick", "--only", "compute,environment",
                                   "--out", str(tmp_path))
    assert code == 1
    assert report["sections"]["compute"]["status"] == "error"
    assert "RuntimeError: planted" in report["sections"]["compute"]["rows"][0]["result"]
    assert "RuntimeError: planted" in report["sections"]["compute"]["traceback"]
    assert report["sections"]["environment"]["status"] == "done"  # ran after the broken one


def test_a_termination_keeps_the_rows_already_written(monkeypatch, tmp_path):
    def killed(bench):
        bench.row("first row", "ok", "written before the signal")
        raise gpu_check.Terminated("signal 15")

    monkeypatch.setitem(gpu_check.SECTION_FUNCS, "compute", killed)
    code, text, report = run_check("--device", "cpu", "--tiny", "--quick", "--only", "environment,compute,streaming",
                                   "--out", str(tmp_path))
    assert code == 1 and "terminated" in text
    assert list(report["sections"]) == ["environment", "compute"]  # streaming never started
    assert [r["name"] for r in report["sections"]["compute"]["rows"]] == ["first row", "compute: terminated"]
    assert "written before the signal" in (tmp_path / "gpu_check.md").read_text()


# --------------------------------------------------------------------------- no device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_the_default_invocation_exits_2_with_the_message():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs a CUDA GPU" in done.stderr and "--device cpu --tiny" in done.stderr
    assert "Traceback" not in done.stderr


def test_real_widths_on_the_cpu_are_refused_with_exit_2():
    code, text, _ = run_check("--device", "cpu")
    assert code == 2 and "--tiny" in text


# --------------------------------------------------------------------------- formulas, by hand


def test_block_flops_at_544x992x51_by_hand():
    n, d = 18_972, 6_144
    assert lib.tokens_of((992, 544, 51)) == n == 9 * 34 * 62 and lib.TEXT_TOKENS == 397
    f = lib.block_flops(n, d)
    # Linear on video tokens: 2 * 14 * N * d^2 = 28 * 18,972 * 37,748,736 = 20,052,732,542,976
    assert d * d == 37_748_736 and f["linear"] == 20_052_732_542_976
    # cross-attention k|v on the 397 text tokens: 2 * 2 * 397 * d^2 = 59,944,992,768
    assert f["text_kv"] == 59_944_992_768
    # self-attention: 4 * N^2 * d = 4 * 359,936,784 * 6,144 = 8,845,806,403,584
    assert n * n == 359_936_784 and f["self_attention"] == 8_845_806_403_584
    # cross-attention: 4 * N * 397 * d = 185,103,581,184
    assert f["cross_attention"] == 185_103_581_184
    assert f["total"] == 29_143_587_520_512
    # achieved rate: 29.14 TFLOP in 0.1 s = 291.4 TFLOP/s
    assert lib.tflops(f["total"], 0.1) == pytest.approx(291.43587520512)
    assert lib.tflops(f["total"], 0.0) is None
    # batch 2 (batched CFG) doubles every term; 75,888 tokens (x204): attention 4 * 75,888^2 * 6,144
    assert lib.block_flops(n, d, batch=2)["total"] == 2 * f["total"]
    assert lib.block_flops(75_888, d)["self_attention"] == 141_532_902_457_344
    assert lib.block_flops(75_888, d)["linear"] == 80_210_930_171_904


def test_block_flops_agree_with_the_plan_route(pack):
    routes = sys.modules[f"{pack.__name__}.nodes.routes"]
    for frames in (51, 204):
        n = lib.tokens_of((992, 544, frames))
        per_block = routes.step_flops(992, 544, frames, False, {"num_layers": 1})
        assert per_block == lib.block_flops(n, 6144)["total"]
        assert routes.step_flops(992, 544, frames, True) == 2 * 48 * lib.block_flops(n, 6144)["total"]


def test_block_flops_agree_with_torch_flop_counter_on_the_real_block():
    """torch's FlopCounterMode counts the real block code (meta device: no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stepvideo_core.dit.blocks import StepVideoBlock

    d, n = 6144, 18_972
    block = StepVideoBlock(d, 128, device="meta", dtype=torch.bfloat16)
    meta = dict(device="meta", dtype=torch.bfloat16)
    rope = (torch.empty(n, 128, **meta), torch.empty(n, 128, **meta), torch.arange(128, device="meta"))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(torch.empty(1, n, d, **meta), torch.empty(1, 397, d, **meta), torch.empty(1, 6 * d, **meta), rope,
              torch.ones(1, 1, 1, 397, dtype=torch.bool, device="meta"))
    assert counter.get_total_flops() == lib.block_flops(n, d)["total"]


def test_llm_layer_flops_by_hand():
    # width 6144, 48 heads of 128, 8 KV groups -> kv rows 2 * 128 * 8 = 2048; SwiGLU width 16,896
    # per token MACs: 6144 * (6144 + 2048) + 6144^2 + 6144 * 33,792 + 16,896 * 6144 = 399,507,456
    per_token = 6144 * 8192 + 6144 * 6144 + 6144 * 33792 + 16896 * 6144
    assert per_token == 399_507_456
    # batch 2 x 320 tokens: 2 * (2 * 320 * 399,507,456 + 4 * 320^2 * 6144) = 2 * (255,684,771,840 + 2,516,582,400)
    assert lib.llm_layer_flops(320, 2, 6144, 48, 8, 16896) == 2 * (2 * 320 * per_token + 4 * 320 * 320 * 6144) \
        == 516_402_708_480


def test_memory_formulas_and_the_scaled_planner_comparison():
    # one hidden-state copy at 544x992x204 with batched CFG: 2 * 75,888 * 6144 * 2 B = 1,865,023,488 B (1.74 GiB)
    assert lib.hidden_unit(75_888, 6144, batch=2) == 1_865_023_488
    # the planner's units at a block's peak: 9.5 (bf16), +1 with fp8 weights; SageAttention's 4.5 + 1.5 stays below
    assert lib.planner_block_units("bf16") == 9.5 and lib.planner_block_units("fp8_scaled") == 10.5
    assert lib.planner_block_units("bf16", "sageattention") == 9.5
    # ... plus 4 context copies of 397 tokens and, with fp8, two dequantised 4d x d weights
    u = lib.hidden_unit(18_972, 6144)
    assert lib.planner_block_peak(18_972, 6144, "bf16") == int(9.5 * u + 4 * 397 * 6144 * 2)
    assert lib.planner_block_peak(18_972, 6144, "fp8_scaled") == int(10.5 * u + 4 * 397 * 6144 * 2
                                                                      + 2 * 4 * 6144 * 6144 * 2)
    # a bf16 block is 604,041,728 parameters = 1,208,083,456 B; measured 30e9 B with 4 of 4 blocks resident is,
    # with 48 of 48 resident, 30e9 + 44 * 1,208,083,456 = 83,155,672,064 B; streaming rows (0 resident) and
    # half-resident rows scale the same way, activations and slots not at all
    block = 2 * 604_041_728
    assert lib.scale_to_release(30_000_000_000, 4, 48, block) == 83_155_672_064
    assert lib.scale_to_release(30_000_000_000, 0, 0, block) == 30_000_000_000
    assert lib.scale_to_release(30_000_000_000, 2, 24, block) == 30_000_000_000 + 22 * block
    assert [lib.blocks_for(c, 4) for c in ("0", "some", "all")] == [0, 2, 4]
    assert [lib.blocks_for(c, 48) for c in ("0", "some", "all")] == [0, 24, 48]
    # the row check: predicted may exceed the measurement, but not fall more than 10 % below it
    assert lib.planner_check(90, 100) == ("ok", 0.9)
    assert lib.planner_check(89, 100)[0] == "FAIL"
    assert lib.planner_check(150, 100) == ("ok", 1.5)
    assert lib.planner_check(100, None)[0] == "skip"


def test_streaming_and_rss_checks():
    # resident 500 ms, streamed 520 ms, 200 ms of copies: 20 ms exposed -> 90 % hidden
    assert lib.hidden_fraction(0.5, 0.52, 0.2) == pytest.approx(0.9)
    assert lib.hidden_fraction(0.5, 0.45, 0.2) == 1.0 and lib.hidden_fraction(0.5, 0.9, 0.2) == 0.0
    assert lib.hidden_fraction(0.5, 0.5, 0.0) is None
    mib = lib.MiB
    # run 1 may pin (+5 GiB); runs 2 and 3 may add at most 256 MiB
    assert lib.rss_check([1 << 30, 6 << 30, 6 << 30, (6 << 30) + 100 * mib]) == ("ok", 100 * mib)
    assert lib.rss_check([1 << 30, 6 << 30, 7 << 30, 8 << 30])[0] == "FAIL"
    assert lib.rss_check([None, 1, 2, 3])[0] == "skip"
    assert lib.median([3.0, 1.0, 2.0]) == 2.0 and lib.median([1.0, 2.0]) == 1.5


def test_exit_code_and_error_checks():
    ok = lib.row("compute", "a", "ok", "fine")
    assert lib.exit_code({"sections": {"compute": {"status": "done", "rows": [ok]}}}) == 0
    for bad in ("FAIL", "error"):
        report = {"sections": {"compute": {"status": "done", "rows": [ok, lib.row("compute", "b", bad, "x")]}}}
        assert lib.exit_code(report) == 1 and lib.failures(report) == ["compute: b: x"]
    for harmless in ("warn", "skip", "info"):
        assert lib.exit_code({"sections": {"c": {"status": "done", "rows": [lib.row("c", "b", harmless, "")]}}}) == 0
    assert lib.exit_code({"sections": {"c": {"status": "error", "rows": []}}}) == 1
    assert lib.error_check(0.03, 0.05) == "ok" and lib.error_check(0.06, 0.05) == "FAIL"
    assert lib.error_check(float("nan"), 0.05) == "FAIL"
    with pytest.raises(ValueError):
        lib.row("c", "b", "bad status", "")


def test_fp8_bounds_are_the_ones_the_fp8_tests_use():
    """The check mirrors tests/core/test_fp8.py's MODES (mode, bound); this fails when one changes alone."""
    from tests.core import test_fp8

    modes = dict(getattr(p, "values", p) for p in test_fp8.MODES)  # pytest.param(...) or a plain tuple
    assert modes == lib.FP8_BOUNDS


def test_the_estimates_fit_the_budgets_with_margin():
    for quick in (True, False):
        spec = lib.make_spec(False, quick)
        est = lib.estimate(spec, gpu_check.estimate_sizes(spec), gpu_check.vae_decode_flops(spec))
        assert est["budget_s"] == (180 if quick else 480)
        assert est["total_s"] <= 0.75 * est["budget_s"], lib.format_estimate(est)
        assert set(est["sections"]) == {"startup", *lib.SECTIONS}
    # the real-width spec is the release's width and the token counts of the issue
    spec = lib.make_spec(False, True)
    assert spec.dim == 6144 and spec.layers == 4
    assert [lib.tokens_of(s) for s in spec.compute_sizes] == [18_972, 75_888]
