"""The pack in a real ComfyUI server (``main.py --cpu`` on loopback, tiny models): the shipped
API workflows run through ``/prompt`` with progress on the websocket and an mp4 behind
``/history`` + ``/view``; bad inputs come back as ``node_errors``; ``/interrupt`` stops a
sampler mid-run; the memory-plan route answers.

Skipped unless COMFYUI_DIR is set, failed instead under CI=true (see tests/e2e/conftest.py and the
README's e2e section).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.e2e.comfy_server import REPO_ROOT, at_first_progress

API_WORKFLOWS = sorted((REPO_ROOT / "workflows" / "api").glob("*.json"))
TINY = dict(width=64, height=48, frames=17, steps=2)  # 3 latent frames x 3 x 4 tokens
SAMPLER = "StepVideoSampler"


def load_api(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return found


NATIVE_SAMPLER = "SamplerCustomAdvanced"   # the native workflows' sampling node (core's)


def sampling_node(prompt: dict) -> str:
    """The id of the node that samples: StepVideoSampler, or core's sampler in a native workflow."""
    (found,) = [k for k, v in prompt.items() if v["class_type"] in (SAMPLER, NATIVE_SAMPLER)]
    return found


def tiny(prompt: dict, **overrides) -> dict:
    """The API graph with every sampler shrunk to the tiny size (and any other overrides).

    Native graphs take the size from StepVideo Empty Latent, the steps from StepVideo Scheduler and the
    seed from StepVideo Noise.
    """
    prompt = copy.deepcopy(prompt)
    settings = dict(TINY, **overrides)
    for node in prompt.values():
        if node["class_type"] == SAMPLER:
            node["inputs"].update(settings)
        elif node["class_type"] in ("StepVideoEmptyLatent", "StepVideoImageToVideo", "StepVideoNativeImageToVideo"):
            node["inputs"].update({k: settings[k] for k in ("width", "height", "frames")})
        elif node["class_type"] == "StepVideoScheduler":
            node["inputs"]["steps"] = settings["steps"]
        elif node["class_type"] == "StepVideoNoise" and "seed" in settings:
            node["inputs"]["noise_seed"] = settings["seed"]
    return prompt


def video_facts(data: bytes, tmp_path: Path) -> dict:
    """Frame count, size and codec of an mp4 (PyAV decodes every frame)."""
    if importlib.util.find_spec("av") is None:
        skip_or_fail("PyAV (av) is needed to check the mp4: pip install -r requirements.txt")
    import av

    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {"frames": frames, "width": stream.codec_context.width, "height": stream.codec_context.height,
                "codec": stream.codec_context.name}


def test_pack_imports_and_every_node_is_listed(comfy_server, pack):
    log = comfy_server.log_text()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, comfy_server.log_tail()
    status, info = comfy_server.get("/object_info")
    assert status == 200
    missing = sorted(set(pack.NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"nodes missing from /object_info: {missing}"
    assert info[SAMPLER]["python_module"].startswith("custom_nodes.")


def test_shipped_model_names_are_offered(comfy_server):
    """The workflows name the README's layout; the tiny files are laid out the same way."""
    _, info = comfy_server.get("/object_info")
    for path in API_WORKFLOWS:
        for node in load_api(path).values():
            spec = info.get(node["class_type"], {}).get("input", {}).get("required", {})
            for name, value in node["inputs"].items():
                options = spec.get(name, [None])[0]
                if isinstance(options, list) and name in ("model", "step_llm", "hunyuan_clip", "vae_name"):
                    assert value in options, f"{path.name}: {node['class_type']}.{name}={value!r} not in {options}"


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_makes_an_mp4(comfy_server, workflow, tmp_path):
    prompt = tiny(load_api(workflow))
    sampler = sampling_node(prompt)
    native = prompt[sampler]["class_type"] == NATIVE_SAMPLER
    result = comfy_server.run(prompt, timeout=600, extra_data={"preview_method": "auto"})  # the frontend's setting
    assert result.status == "success", json.dumps(result.history, indent=1)[-3000:]
    assert result.of_type("execution_success"), result.messages

    progress = [d for d in result.of_type("progress") if d.get("node") == sampler]
    assert progress, "no progress message from the sampler"
    assert {d["max"] for d in progress} == {TINY["steps"]} and progress[-1]["value"] == TINY["steps"]
    # latent previews are binary websocket frames: the pack's sampler colours them from the connected
    # preview_vae; the native model's latent format has no latent->RGB factors, so core's samplers send none
    if native:
        assert result.binary_frames == 0
    else:
        assert result.binary_frames >= 1

    (video,) = result.output_files(".mp4")
    facts = video_facts(comfy_server.view(video), tmp_path)
    assert facts == {"frames": TINY["frames"], "width": TINY["width"], "height": TINY["height"], "codec": "h264"}
    if native:
        return
    summary = result.history["outputs"][sampler]["text"][0]
    assert f"{TINY['steps']} steps" in summary and "64x48x17" in summary



def test_preview_method_none_sends_progress_without_previews(comfy_server):
    """ComfyUI's preview method "none" (its default; here the prompt's frontend setting) turns the sampler's
    previews off: progress for every step, no preview image."""
    prompt = tiny(load_api(API_WORKFLOWS[0]), seed=5)
    sampler = node_id(prompt, SAMPLER)
    assert "preview_vae" in prompt[sampler]["inputs"]  # previews would be coloured: only the method stops them
    result = comfy_server.run(prompt, timeout=600, extra_data={"preview_method": "none"})
    assert result.status == "success", json.dumps(result.history, indent=1)[-3000:]
    progress = [d for d in result.of_type("progress") if d.get("node") == sampler]
    assert progress and progress[-1]["value"] == TINY["steps"]
    assert result.binary_frames == 0

def test_bad_inputs_come_back_as_node_errors(comfy_server):
    prompt = tiny(load_api(API_WORKFLOWS[0]))
    sampler = node_id(prompt, SAMPLER)
    loader = node_id(prompt, "StepVideoModelLoader")
    prompt[sampler]["inputs"]["width"] = 0
    prompt[loader]["inputs"]["model"] = "no-such-model"
    status, body = comfy_server.submit(prompt, "e2e-bad-input")
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"]
    assert {e["type"] for e in errors[sampler]["errors"]} == {"value_smaller_than_min"}
    assert errors[sampler]["errors"][0]["extra_info"]["input_name"] == "width"
    assert errors[loader]["errors"][0]["type"] == "value_not_in_list"


def test_size_off_the_grid_fails_with_the_nearest_valid_values(comfy_server):
    """ComfyUI checks only min/max; frames=20 reaches the sampler, which names what would work."""
    prompt = tiny(load_api(API_WORKFLOWS[0]), frames=20, seed=7)
    result = comfy_server.run(prompt, timeout=300)
    assert result.status == "error"
    (error,) = result.of_type("execution_error")
    assert error["node_type"] == SAMPLER
    assert "nearest valid: 17 or 34" in error["exception_message"]


def test_interrupt_mid_sampling_then_the_next_run_succeeds(comfy_server):
    workflow = load_api(API_WORKFLOWS[0])
    long_run = tiny(workflow, width=256, height=256, frames=34, steps=1000, seed=11)
    sampler = node_id(long_run, SAMPLER)

    def interrupt(result):
        status, _ = comfy_server.post("/interrupt", {"prompt_id": result.prompt_id})
        assert status == 200

    interrupt_on_first_step, sent = at_first_progress(sampler, interrupt)
    result = comfy_server.run(long_run, timeout=600, on_message=interrupt_on_first_step)
    assert sent.is_set(), "the sampler never reported progress"
    assert result.of_type("execution_interrupted"), result.messages[-5:]
    assert result.status == "error"
    steps_seen = max(d["value"] for d in result.of_type("progress") if d.get("node") == sampler)
    assert steps_seen < 1000
    assert result.seconds < 300

    after = comfy_server.run(tiny(workflow, seed=12), timeout=600)
    assert after.status == "success", json.dumps(after.history, indent=1)[-3000:]
    assert after.output_files(".mp4")


def test_plan_route_answers_for_the_chosen_model(comfy_server):
    status, body = comfy_server.get("/api/stepvideo/plan?width=64&height=48&frames=17&model=stepvideo-t2v")
    assert status == 200
    assert body["device"]["type"] == "cpu" and body["fits"] is None
    assert body["model"] == {"name": "stepvideo-t2v", "found": True, "layers": 2, "width": 256,
                             "stored_format": "full", "error": None}
    assert body["plan"]["tokens"] == 3 * 3 * 4
    status, body = comfy_server.get("/stepvideo/plan?free_gb=24&weight_dtype=fp8_scaled")
    assert status == 200 and body["fits"] is True and body["plan"]["free_bytes"] == 24 * 2**30
    status, body = comfy_server.get("/api/stepvideo/plan?frames=100")
    assert status == 400 and "nearest valid: 85 or 102" in body["error"]


@pytest.mark.parametrize("node_type, name", [(SAMPLER, "cfg"), (SAMPLER, "shift"), ("StepVideoLoraLoader", "strength")])
def test_a_json_nan_fails_the_run_instead_of_a_black_video(comfy_server, node_type, name):
    """A JSON NaN passes ComfyUI's min/max check (every comparison with NaN is false); the node refuses it."""
    workflows = [w for w in API_WORKFLOWS if node_type in {n["class_type"] for n in load_api(w).values()}]
    if not workflows:  # no shipped workflow has a LoRA loader: put one between the model loader and the sampler
        prompt = tiny(load_api(API_WORKFLOWS[0]), seed=21)
        sampler, loader = node_id(prompt, SAMPLER), node_id(prompt, "StepVideoModelLoader")
        _, info = comfy_server.get("/object_info/StepVideoLoraLoader")
        loras = info["StepVideoLoraLoader"]["input"]["required"]["lora_name"][0]
        assert loras == ["tiny_lora.safetensors"]
        prompt["900"] = {"class_type": "StepVideoLoraLoader",
                         "inputs": {"model": [loader, 0], "lora_name": loras[0], "strength": 1.0, "mode": "auto",
                                    "blocks": ""}}
        prompt[sampler]["inputs"]["model"] = ["900", 0]
    else:
        prompt = tiny(load_api(workflows[0]), seed=21)
    prompt[node_id(prompt, node_type)]["inputs"][name] = float("nan")
    result = comfy_server.run(prompt, timeout=300)
    assert result.status == "error", json.dumps(result.history, indent=1)[-2000:]
    (error,) = result.of_type("execution_error")
    assert error["node_type"] == node_type
    assert f"{name} must be a finite number, got nan" in error["exception_message"]
    assert not result.output_files(".mp4")
