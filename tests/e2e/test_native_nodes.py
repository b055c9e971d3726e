"""The native node family inside ComfyUI: registered only there, well-formed V1 nodes, the loader on
ComfyUI's model folders, the text-encode and converter nodes, and whole native graphs (KSampler;
SamplerCustomAdvanced with StepVideo Scheduler / Noise and EasyCache) run through a real server's
``/prompt`` to an mp4.

Needs COMFYUI_DIR (see tests/e2e/conftest.py); skipped without it, failed under CI=true.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from tests.conftest import import_pack
from tests.factory import write_tiny_dit, write_tiny_text_encoders
from tests.nodes.test_pack import check_input
from tests.e2e.test_native_support import comfy  # noqa: F401 - fixtures

NATIVE_IDS = {"StepVideoNativeModelLoader", "StepVideoNativeTextEncode", "StepVideoNativeConditioning",
              "StepVideoEmptyLatent", "StepVideoScheduler", "StepVideoNoise", "StepVideoNativeImageToVideo"}


@pytest.fixture(scope="module")
def in_comfy(comfy):
    """The pack imported once more now that ComfyUI is importable (as ComfyUI itself imports it)."""
    return import_pack("stepvideo_pack_in_comfyui")


def test_native_nodes_are_registered_inside_comfyui(in_comfy):
    """(Without ComfyUI they are not: tests/nodes/test_pack.py.)"""
    assert NATIVE_IDS <= set(in_comfy.NODE_CLASS_MAPPINGS)
    for node_id in NATIVE_IDS:
        cls = in_comfy.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "StepVideo/native"
        assert in_comfy.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("StepVideo ")
        spec = cls.INPUT_TYPES()
        for name, entry in spec["required"].items():
            check_input(node_id, name, entry)
        assert callable(getattr(cls, cls.FUNCTION))
    out = {i: in_comfy.NODE_CLASS_MAPPINGS[i].RETURN_TYPES for i in NATIVE_IDS}
    assert out["StepVideoNativeModelLoader"] == ("MODEL",) and out["StepVideoScheduler"] == ("SIGMAS",)
    assert out["StepVideoNoise"] == ("NOISE",) and out["StepVideoEmptyLatent"] == ("LATENT",)
    assert out["StepVideoNativeTextEncode"] == out["StepVideoNativeConditioning"] == ("CONDITIONING",)


def test_existing_node_ids_return_what_they_did(in_comfy):
    mappings = in_comfy.NODE_CLASS_MAPPINGS
    assert mappings["StepVideoModelLoader"].RETURN_TYPES == ("STEPVIDEO_MODEL",)
    assert mappings["StepVideoSampler"].RETURN_TYPES == ("LATENT",)
    assert mappings["StepVideoTextEncode"].RETURN_TYPES == ("STEPVIDEO_CONDITIONING",)


@pytest.fixture
def model_folder(in_comfy, tmp_path, monkeypatch):
    import folder_paths

    dm = tmp_path / "diffusion_models"
    write_tiny_dit(dm / "stepvideo-t2v-tiny")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(dm)], folder_paths.supported_pt_extensions))
    return dm


@pytest.mark.parametrize("weight_dtype, fp8", [("default", False), ("fp8_scaled", True)])
def test_loader_gives_a_comfy_managed_model(in_comfy, comfy, model_folder, weight_dtype, fp8):
    loader = in_comfy.NODE_CLASS_MAPPINGS["StepVideoNativeModelLoader"]
    assert loader.INPUT_TYPES()["required"]["model"][0] == ["stepvideo-t2v-tiny"]
    assert "fp8_scaled" in loader.INPUT_TYPES()["required"]["weight_dtype"][0]
    out = loader().load(model="stepvideo-t2v-tiny", weight_dtype=weight_dtype, attention="sdpa")
    (patcher,) = out["result"]
    native_model = importlib.import_module("stepvideo_pack_in_comfyui.nodes.native_model")
    assert isinstance(patcher, comfy.patcher.ModelPatcher) and native_model.is_stepvideo_patcher(patcher)
    assert patcher.load_device == comfy.mm.get_torch_device()
    assert patcher.offload_device == comfy.mm.unet_offload_device()
    assert next(patcher.model.diffusion_model.parameters()).device == patcher.offload_device
    wqkv = patcher.model.diffusion_model.transformer_blocks[0].attn1.wqkv
    assert (wqkv.weight.dtype == torch.float8_e4m3fn) is fp8
    assert patcher.model.diffusion_model.attention_backend == "sdpa"
    assert "(native)" in out["ui"]["text"][0] and "ComfyUI-managed" in out["ui"]["text"][0]
    assert patcher.cached_patcher_init is not None
    assert isinstance(loader.IS_CHANGED("stepvideo-t2v-tiny", weight_dtype, "sdpa"), str)


def test_text_encode_and_converter_give_the_same_conditioning(in_comfy, tmp_path, monkeypatch):
    import folder_paths

    te = tmp_path / "text_encoders"
    write_tiny_text_encoders(te / "stepvideo-t2v")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders",
                        ([str(te)], folder_paths.supported_pt_extensions))
    m = in_comfy.NODE_CLASS_MAPPINGS
    (encoder,) = m["StepVideoTextEncoderLoader"]().load("stepvideo-t2v", "stepvideo-t2v", "fp32", True, "cpu")["result"]
    (pack_cond,) = m["StepVideoTextEncode"]().encode(encoder, "a red fox", True)["result"]
    out = m["StepVideoNativeTextEncode"]().encode(text_encoder=encoder, prompt="a red fox", add_magic=True)
    (native,) = out["result"]
    assert "Step-LLM tokens" in out["ui"]["text"][0]
    (converted,) = m["StepVideoNativeConditioning"]().convert(pack_cond)
    for cond in (native, converted):
        ((states, extras),) = cond
        assert torch.equal(states, pack_cond.encoder_hidden_states)
        assert torch.equal(extras["stepvideo_clip_states"], pack_cond.encoder_hidden_states_2)
        assert torch.equal(extras["attention_mask"], pack_cond.encoder_attention_mask)


# --------------------------------------------------------------------------- a real server


def ksampler_graph(seed=1):
    """Native loader + text encode (positive) + negative node via the converter + KSampler + decode + mp4."""
    return {
        "1": {"class_type": "StepVideoNativeModelLoader",
              "inputs": {"model": "stepvideo-t2v", "weight_dtype": "default", "attention": "sdpa"}},
        "2": {"class_type": "StepVideoTextEncoderLoader",
              "inputs": {"step_llm": "stepvideo-t2v", "hunyuan_clip": "stepvideo-t2v", "weight_dtype": "default",
                         "alibi": True, "device_plan": "auto"}},
        "3": {"class_type": "StepVideoNativeTextEncode",
              "inputs": {"text_encoder": ["2", 0], "prompt": "a red fox in the snow", "add_magic": True}},
        "4": {"class_type": "StepVideoNegativeTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "blurry"}},
        "5": {"class_type": "StepVideoNativeConditioning", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "StepVideoEmptyLatent", "inputs": {"width": 64, "height": 48, "frames": 17, "batch_size": 1}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["3", 0], "negative": ["5", 0], "latent_image": ["6", 0],
                         "denoise": 1.0}},
        "8": {"class_type": "StepVideoVAELoader", "inputs": {"vae_name": "stepvideo/vae_v2.safetensors",
                                                             "weight_dtype": "default"}},
        "9": {"class_type": "StepVideoVAEDecode", "inputs": {"vae": ["8", 0], "samples": ["7", 0], "tile_size": 0,
                                                            "tile_overlap": 8}},
        "10": {"class_type": "CreateVideo", "inputs": {"images": ["9", 0], "fps": 25.0, "bit_depth": 8}},
        "11": {"class_type": "SaveVideo", "inputs": {"video": ["10", 0], "filename_prefix": "video/native",
                                                     "format": "mp4", "format.codec": "h264",
                                                     "format.codec.encoding": "auto", "codec": "auto"}},
    }


def custom_graph(seed=2):
    """The same with SamplerCustomAdvanced: EasyCache, CFGGuider, euler, StepVideo Scheduler and Noise."""
    graph = ksampler_graph(seed)
    del graph["7"]
    graph.update({
        "20": {"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": 0.2, "start_percent": 0.15,
                                                     "end_percent": 0.95, "verbose": False}},
        "21": {"class_type": "CFGGuider", "inputs": {"model": ["20", 0], "positive": ["3", 0], "negative": ["5", 0],
                                                     "cfg": 5.0}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "23": {"class_type": "StepVideoScheduler", "inputs": {"steps": 3, "shift": 17.0, "denoise": 1.0}},
        "24": {"class_type": "StepVideoNoise", "inputs": {"noise_seed": seed}},
        "25": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["24", 0], "guider": ["21", 0], "sampler": ["22", 0], "sigmas": ["23", 0],
                          "latent_image": ["6", 0]}},
    })
    graph["9"]["inputs"]["samples"] = ["25", 0]
    return graph


def test_server_lists_the_native_nodes(comfy_server):
    _, info = comfy_server.get("/object_info")
    missing = sorted(NATIVE_IDS - set(info))
    assert not missing, f"native nodes missing from /object_info: {missing}; {comfy_server.log_tail()}"
    assert info["StepVideoNativeModelLoader"]["input"]["required"]["model"][0] == ["stepvideo-t2v",
                                                                                  "stepvideo-t2v-turbo",
                                                                                  "stepvideo-ti2v"]


@pytest.mark.parametrize("graph", [ksampler_graph, custom_graph], ids=["ksampler", "sampler_custom_advanced"])
def test_native_graph_makes_an_mp4(comfy_server, graph, tmp_path):
    from tests.e2e.test_comfyui_server import video_facts

    result = comfy_server.run(graph(), timeout=600)
    assert result.status == "success", json.dumps(result.history, indent=1)[-3000:] + comfy_server.log_tail()
    (video,) = result.output_files(".mp4")
    facts = video_facts(comfy_server.view(video), tmp_path)
    assert facts == {"frames": 17, "width": 64, "height": 48, "codec": "h264"}


def decoded_frames(comfy_server, result) -> torch.Tensor:
    """The frames SaveImage wrote for a run (lossless PNG), uint8 [F, H, W, 3], in frame order."""
    import io

    import numpy as np
    from PIL import Image

    files = sorted(result.output_files(".png"), key=lambda f: f["filename"])
    frames = [np.array(Image.open(io.BytesIO(comfy_server.view(f))).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(frames))


def test_native_workflow_makes_the_one_node_workflows_video(comfy_server):
    """The shipped native twin and the one-node workflow, same seed and tiny size: the same frames.

    Compared on the decoded frames (SaveImage, lossless), not on the mp4: H.264 turns a one-level
    difference into a different encoding decision.  Both run in fp32 here, where the latents agree to
    float rounding (``test_native_parity.py``), so the 8-bit frames may differ by one level at a rounding
    edge, no more.  In bf16 (the CPU default) they differ by more: core combines CFG in fp32, the
    one-node sampler in bf16 (``test_bf16_difference_is_cfg_in_fp32_then_bf16_rounding_of_the_latents``).
    """
    from tests.e2e.test_comfyui_server import API_WORKFLOWS, load_api, node_id, tiny

    by_name = {p.stem: p for p in API_WORKFLOWS}
    clips = {}
    for name in ("stepvideo_t2v", "stepvideo_t2v_native"):
        prompt = tiny(load_api(by_name[name]), seed=5)
        for node in prompt.values():
            if node["class_type"] in ("StepVideoModelLoader", "StepVideoNativeModelLoader", "StepVideoVAELoader"):
                node["inputs"]["weight_dtype"] = "fp32"
        prompt["990"] = {"class_type": "SaveImage", "inputs": {"images": [node_id(prompt, "StepVideoVAEDecode"), 0],
                                                               "filename_prefix": f"compare/{name}"}}
        result = comfy_server.run(prompt, timeout=600)
        assert result.status == "success", json.dumps(result.history, indent=1)[-3000:] + comfy_server.log_tail()
        assert len(result.output_files(".mp4")) == 1
        clips[name] = decoded_frames(comfy_server, result).int()
    one_node, native = clips["stepvideo_t2v"], clips["stepvideo_t2v_native"]
    assert one_node.shape == native.shape == (17, 48, 64, 3)
    assert (one_node - native).abs().max() <= 1, (one_node != native).float().mean()
    assert one_node.float().std() > 1  # a real picture, not a flat frame


def test_native_core_node_specs_are_those_of_this_comfyui(comfy_server):
    """workflows/build.py writes the native workflows from its copy of core's node specs: they must be this
    ComfyUI's (the inputs in order, the widget options and ranges, the outputs)."""
    import importlib.util

    from tests.e2e.comfy_server import REPO_ROOT

    spec = importlib.util.spec_from_file_location("workflows_build_e2e", REPO_ROOT / "workflows" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    _, info = comfy_server.get("/object_info")
    for node_type, ours in build.CORE_NODES.items():
        if ours.get("virtual"):
            continue
        live = info[node_type]
        declared = {**live["input"].get("required", {}), **live["input"].get("optional", {})}
        # (SaveVideo's nested widgets are written flat by the frontend; LoadImage's upload button is UI-only)
        live_widgets = [(w, spec) for w, spec in ours["widgets"] if "." not in w and not spec.get("ui_only")]
        sockets, widgets = [n for n, _, _ in ours["inputs"]], [w for w, _ in live_widgets]
        assert set(declared) == set(sockets) | set(widgets), node_type
        assert [n for n in declared if n in widgets] == widgets, node_type  # widgets_values are positional
        for name, kind, optional in ours["inputs"]:
            assert declared[name][0] == kind and (name in live["input"].get("optional", {})) == optional
        for name, wspec in live_widgets:
            kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
            if "options" in wspec:
                live_options = kind if isinstance(kind, list) else options.get("options")
                # a dynamic combo (SaveVideo's format) lists {"key": option, "inputs": nested widgets}
                live_options = [o["key"] if isinstance(o, dict) else o for o in live_options]
                assert live_options == wspec["options"], (node_type, name)
            else:
                assert kind == wspec["type"], (node_type, name)
                for bound in ("min", "max", "default"):
                    if bound in wspec:
                        assert options.get(bound) == wspec[bound], (node_type, name, bound)
        assert list(zip(live.get("output_name", []), live["output"])) == [tuple(o) for o in ours["outputs"]], node_type


@pytest.mark.parametrize("node_type, name", [("CFGGuider", "cfg"), ("StepVideoScheduler", "shift")])
def test_a_json_nan_in_a_native_graph_fails_instead_of_a_black_video(comfy_server, node_type, name):
    """A NaN cfg passes core's nodes (which do not check) and reaches the latents: the VAE decode refuses them;
    a NaN shift is refused by the scheduler node itself."""
    from tests.e2e.test_comfyui_server import API_WORKFLOWS, load_api, node_id, tiny

    (path,) = [p for p in API_WORKFLOWS if p.stem == "stepvideo_t2v_native"]
    prompt = tiny(load_api(path), seed=23)
    prompt[node_id(prompt, node_type)]["inputs"][name] = float("nan")
    result = comfy_server.run(prompt, timeout=300)
    assert result.status == "error", json.dumps(result.history, indent=1)[-2000:]
    (error,) = result.of_type("execution_error")
    assert "nan" in error["exception_message"].lower() or "finite" in error["exception_message"], error
    assert not result.output_files(".mp4")
