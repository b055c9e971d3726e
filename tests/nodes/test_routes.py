"""GET /stepvideo/plan (nodes/routes.py): query parsing, the plan it builds, the bridge's route
registration, and the JSON fixtures the web extension's tests read (web/tests/fixtures/)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import types
from pathlib import Path

import pytest

from stepvideo_core.offload import PlanInputs, auto_plan
from stepvideo_core.offload.planner import GiB
from stepvideo_core.tiny import TINY_DIT_CONFIG, write_tiny_dit

REPO = Path(__file__).resolve().parents[2]
WEB_FIXTURES = REPO / "web" / "tests" / "fixtures"
H100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "free_bytes": 79 * GiB, "total_bytes": 80 * GiB,
        "freeable_bytes": 0}
RTX4090 = {"type": "cuda", "name": "NVIDIA GeForce RTX 4090", "free_bytes": 22 * GiB, "total_bytes": 24 * GiB,
           "freeable_bytes": 1 * GiB}
CPU = {"type": "cpu", "name": "cpu", "free_bytes": None, "total_bytes": None, "freeable_bytes": 0}
NO_MODEL = {"name": None, "found": False, "config": None, "stored_format": None, "error": None}


@pytest.fixture
def routes(pack, bridge):
    return sys.modules[f"{pack.__name__}.nodes.routes"]


def plan_for(routes, query, device, model=NO_MODEL):
    return routes.build_plan(routes.parse_query(query), device, model)


# ----------------------------------------------------------------------------- query


def test_defaults_are_the_official_settings(routes):
    req = routes.parse_query({})
    assert req == {"width": 992, "height": 544, "frames": 204, "preset": "Step-Video-T2V", "steps": 50,
                   "cfg": 9.0, "guided": True, "weight_dtype": "auto", "attention": "sdpa",
                   "blocks_on_device": "auto", "model": None, "free_gb": None}


def test_zero_steps_and_cfg_take_the_preset(routes):
    req = routes.parse_query({"preset": "Step-Video-T2V-Turbo", "steps": "0", "cfg": "0"})
    assert (req["steps"], req["cfg"], req["guided"]) == (15, 5.0, True)
    req = routes.parse_query({"steps": "30", "cfg": "1"})
    assert (req["steps"], req["cfg"], req["guided"]) == (30, 1.0, False)


@pytest.mark.parametrize("query, message", [
    ({"width": "1000"}, "nearest valid: 992 or 1008"),
    ({"frames": "100"}, "nearest valid: 85 or 102"),
    ({"height": "abc"}, "height must be an integer"),
    ({"width": "0"}, "between 1 and 4096"),
    ({"frames": "2040"}, "between 1 and 1020"),
    ({"preset": "Nope"}, "preset must be one of"),
    ({"weight_dtype": "int4"}, "weight_dtype must be one of"),
    ({"blocks_on_device": "49"}, "blocks_on_device must be one of"),
    ({"attention": "xformers"}, "attention must be one of"),
    ({"cfg": "nan"}, "cfg must be between"),
    ({"free_gb": "-1"}, "free_gb must be between"),
])
def test_bad_queries_are_answered_with_400_and_a_reason(routes, query, message):
    status, body = routes.plan_handler(query)
    assert status == 400
    assert message in body["error"]


# ----------------------------------------------------------------------------- plan


def test_gpu_plan_is_the_planners_with_free_plus_freeable_memory(routes):
    body = plan_for(routes, {"weight_dtype": "bf16"}, RTX4090)
    expected = auto_plan(PlanInputs(992, 544, 204, weight_format="bf16", compute_dtype="bf16", attention="sdpa"),
                         free_bytes=23 * GiB)
    assert body["plan"] == expected
    assert body["fits"] is True and body["plan"]["blocks_on_device"] < 48
    assert (body["weight_format"], body["compute_dtype"]) == ("bf16", "bf16")


def test_blocks_all_that_cannot_fit_says_so(routes):
    body = plan_for(routes, {"weight_dtype": "bf16", "blocks_on_device": "all"}, RTX4090)
    assert body["fits"] is False
    assert body["plan"]["blocks_on_device"] == 48 and "does not fit" in body["plan"]["message"]


def test_fixed_block_count_is_kept(routes):
    body = plan_for(routes, {"weight_dtype": "fp8_scaled", "blocks_on_device": "10"}, H100)
    assert body["plan"]["blocks_on_device"] == 10 and body["fits"] is True
    assert (body["weight_format"], body["compute_dtype"]) == ("fp8_scaled", "bf16")


def test_default_dtype_follows_the_device(routes):
    assert plan_for(routes, {"weight_dtype": "default"}, H100)["weight_format"] == "bf16"
    assert plan_for(routes, {"weight_dtype": "default"}, CPU)["weight_format"] == "fp32"
    assert plan_for(routes, {"weight_dtype": "fp16"}, CPU)["weight_format"] == "fp16"


def test_auto_dtype_follows_the_file(routes):
    fp8_file = dict(NO_MODEL, name="x", found=True, stored_format="fp8_scaled")
    assert plan_for(routes, {}, H100, fp8_file)["weight_format"] == "fp8_scaled"
    full_file = dict(fp8_file, stored_format="full")
    assert plan_for(routes, {}, H100, full_file)["weight_format"] == "bf16"
    body = plan_for(routes, {}, H100)
    assert body["weight_format"] == "bf16" and "auto dtype, format unknown: planned as bf16" in body["notes"]


def test_cpu_plans_nothing_but_reports_the_peak(routes):
    body = plan_for(routes, {}, CPU)
    assert body["fits"] is None and body["plan"]["fits"] is None and body["plan"]["free_bytes"] is None
    assert body["plan"]["blocks_on_device"] == 48 and body["plan"]["streamed_blocks"] == 0
    assert body["time"] is None
    assert body["plan"]["message"].startswith("cpu: all 48 blocks in place")


def test_assumed_free_memory_plans_a_gpu_even_on_a_cpu_server(routes):
    body = plan_for(routes, {"free_gb": "24", "weight_dtype": "default"}, CPU)
    assert body["device"]["assumed_free_bytes"] == 24 * GiB
    assert body["weight_format"] == "bf16"  # what the default dtype is on a GPU
    assert body["fits"] is True and body["plan"]["free_bytes"] == 24 * GiB
    assert body["time"] is None  # which GPU is unknown
    on_gpu = plan_for(routes, {"free_gb": "24"}, H100)
    assert on_gpu["plan"]["free_bytes"] == 24 * GiB and on_gpu["time"] is not None


def test_time_estimate_is_flops_over_half_the_datasheet_rate(routes):
    body = plan_for(routes, {"weight_dtype": "bf16"}, H100)
    flops = body["flops_per_step"]
    assert 1.5e16 < flops < 3e16  # ~4.6e14 per block of a batched step at 544x992x204, 48 blocks
    t = body["time"]
    assert t["tflops"] == 989.0 and t["utilisation"] == 0.5
    assert t["compute_seconds_per_step"] == pytest.approx(flops / (989e12 * 0.5))
    assert t["seconds"] == pytest.approx(t["seconds_per_step"] * 50)
    assert "not measured" in t["basis"]


def test_step_flops_counts_both_cfg_branches_and_scales_with_tokens(routes):
    one = routes.step_flops(992, 544, 17, guided=False)
    assert routes.step_flops(992, 544, 17, guided=True) == 2 * one
    # 4x the tokens: linear work x4, attention x16
    assert 4 * one < routes.step_flops(992, 544, 68, guided=False) < 16 * one


def test_streaming_time_bounds_a_step_when_copies_dominate(routes):
    plan = {"copies_per_step": 40, "batch_cfg": False}
    t = routes.time_estimate(10**12, 10, plan, block_bytes=10**9, device_name="NVIDIA GeForce RTX 4090",
                             compute_dtype="bf16", guided=True)
    assert t["transfer_seconds_per_step"] == pytest.approx(40 * 2 * 1e9 / 20e9)
    assert t["seconds_per_step"] == t["transfer_seconds_per_step"]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.0), ("NVIDIA RTX A6000", 155.0), ("Some Future GPU", None), (None, None),
])
def test_gpu_table_lookup(routes, name, tflops):
    assert routes.gpu_tflops(name) == tflops


def test_no_time_for_fp32_or_unknown_gpus(routes):
    assert plan_for(routes, {"weight_dtype": "fp32"}, H100)["time"] is None
    assert plan_for(routes, {}, dict(H100, name="Mystery Accelerator"))["time"] is None


# ----------------------------------------------------------------------------- model


def test_model_info_reads_the_tiny_checkpoint_config(routes, models_dir):
    write_tiny_dit(models_dir / "diffusion_models" / "tiny")
    info = routes.model_info("tiny")
    assert info["found"] and info["stored_format"] == "full" and info["error"] is None
    assert info["config"]["num_layers"] == TINY_DIT_CONFIG["num_layers"]
    body = routes.build_plan(routes.parse_query({"width": "64", "height": "64", "frames": "17"}), H100, info)
    assert body["model"]["layers"] == 2 and body["model"]["width"] == 256
    assert body["plan"]["num_blocks"] == 2 and body["notes"] == []


def test_model_info_of_a_missing_entry_explains_and_plans_the_release(routes, models_dir):
    info = routes.model_info("nope")
    assert not info["found"] and "not found" in info["error"]
    body = routes.build_plan(routes.parse_query({}), H100, info)
    assert body["model"]["layers"] == 48 and body["notes"][0] == "model not read: planned for the 30B release"


def test_handler_uses_the_bridge_device_and_model(routes, models_dir, monkeypatch):
    write_tiny_dit(models_dir / "diffusion_models" / "tiny")
    status, body = routes.plan_handler({"model": "tiny", "width": "64", "height": "64", "frames": "17"})
    assert status == 200
    assert body["device"]["type"] in ("cpu", "cuda") and body["model"]["layers"] == 2
    json.dumps(body)  # JSON-serialisable as is


# ----------------------------------------------------------------------------- bridge


class FakeRoutes:
    def __init__(self):
        self.added = []

    def route(self, method, path):
        def decorator(handler):
            self.added.append((method, path, handler))
            return handler
        return decorator


def test_add_route_is_a_noop_outside_comfyui(bridge):
    assert bridge.add_route("GET", "/stepvideo/test-none", lambda q: (200, {})) is False


def test_add_route_registers_once_and_answers_json(bridge, monkeypatch):
    fake_routes = FakeRoutes()
    instance = types.SimpleNamespace(routes=fake_routes)
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance))
    monkeypatch.setitem(bridge._MODULES, "server", server)
    monkeypatch.setattr(bridge.server, "_ROUTES", set())

    def handler(query):
        if query.get("boom"):
            raise RuntimeError("broken")
        return 201, {"echo": query}

    assert bridge.add_route("get", "/stepvideo/test", handler) is True
    assert bridge.add_route("GET", "/stepvideo/test", handler) is False
    assert [(m, p) for m, p, _ in fake_routes.added] == [("GET", "/stepvideo/test")]
    serve = fake_routes.added[0][2]

    import importlib.util

    if importlib.util.find_spec("aiohttp") is None:  # ComfyUI's web server; in the test extras
        from tests.conftest import skip_or_fail

        skip_or_fail("aiohttp is not installed (pip install -e '.[test]'): the route's response cannot be built")

    def request(**query):
        return types.SimpleNamespace(rel_url=types.SimpleNamespace(query=query))

    response = asyncio.run(serve(request(a="1")))
    assert response.status == 201 and json.loads(response.text) == {"echo": {"a": "1"}}
    response = asyncio.run(serve(request(boom="1")))
    assert response.status == 500 and "RuntimeError: broken" in json.loads(response.text)["error"]


def test_device_memory_reads_comfyui_and_this_process_usage(bridge, monkeypatch):
    import torch

    mm = types.SimpleNamespace(get_free_memory=lambda dev: 10 * GiB, get_total_memory=lambda dev: 24 * GiB,
                               get_torch_device=lambda: torch.device("cuda", 0))
    monkeypatch.setitem(bridge._MODULES, "comfy.model_management", mm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a pretend GPU: nothing below touches one
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 3 * GiB)
    info = bridge.device_memory(torch.device("cuda", 0))
    assert info == {"type": "cuda", "name": "Pretend GPU", "free_bytes": 10 * GiB, "total_bytes": 24 * GiB,
                    "freeable_bytes": 3 * GiB}
    assert bridge.device_memory(torch.device("cpu"))["free_bytes"] is None


def test_pack_import_registers_nothing_outside_comfyui(pack):
    bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
    assert bridge.server._prompt_server() is None or "server" in sys.modules


# ----------------------------------------------------------------------------- web fixtures


def fixture_cases(routes):
    tiny = {"name": "stepvideo-t2v", "found": True, "config": dict(TINY_DIT_CONFIG), "stored_format": "full",
            "error": None}
    return {
        "plan_gpu_fits.json": lambda: plan_for(routes, {"weight_dtype": "fp8_scaled"}, H100),
        "plan_gpu_streams.json": lambda: plan_for(routes, {"weight_dtype": "bf16", "frames": "102"}, RTX4090),
        "plan_gpu_no_fit.json": lambda: plan_for(routes, {"weight_dtype": "bf16", "blocks_on_device": "all"},
                                                 RTX4090),
        "plan_cpu_tiny.json": lambda: plan_for(routes, {"width": "64", "height": "64", "frames": "17",
                                                        "model": "stepvideo-t2v"}, CPU, tiny),
        "plan_bad_size.json": lambda: routes.plan_handler({"width": "1000"})[1],
    }


def test_web_fixtures_are_what_the_route_answers(routes):
    """web/tests/plan.test.mjs formats these answers; they must stay the route's real output.

    Regenerate with STEPVIDEO_WRITE_WEB_FIXTURES=1 after changing the route.
    """
    write = os.environ.get("STEPVIDEO_WRITE_WEB_FIXTURES") == "1"
    stale = []
    for name, make in fixture_cases(routes).items():
        text = json.dumps(make(), indent=1, sort_keys=True) + "\n"
        path = WEB_FIXTURES / name
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.is_file() or path.read_text() != text:
            stale.append(name)
    assert not stale, f"web fixtures out of date: {stale}; rerun with STEPVIDEO_WRITE_WEB_FIXTURES=1"
