"""The shipped workflows (workflows/*.json, UI format, and their API twins in workflows/api/) against the pack.

Checks what ComfyUI and its frontend would check, without them: node types exist,
links join sockets of the same type, widget values are valid for their inputs
(combos with the model files laid out as the README documents them), the API
twin is the same graph, and the files are what ``workflows/build.py`` writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from stepvideo_core.sampling import PRESETS, check_video_size, resolve_settings
from stepvideo_core.text.encoder import NEGATIVE_PROMPT

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
NAMES = ("stepvideo_t2v", "stepvideo_t2v_turbo", "stepvideo_t2v_24gb", "stepvideo_ti2v", "stepvideo_t2v_native",
         "stepvideo_t2v_24gb_native")
NATIVE = {"stepvideo_t2v_native": "stepvideo_t2v", "stepvideo_t2v_24gb_native": "stepvideo_t2v_24gb"}  # -> one-node twin
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

# Core ComfyUI nodes (v0.33, frontend 1.49.6), written out here: sockets and widgets in UI order.
CORE = {
    "CreateVideo": dict(inputs={"images": "IMAGE", "audio": "AUDIO"}, required={"images"},
                        outputs=[("VIDEO", "VIDEO")],
                        widgets=[("fps", ("FLOAT", 1.0, 120.0)), ("bit_depth", ("INT", 8, 10))]),
    "SaveVideo": dict(inputs={"video": "VIDEO"}, required={"video"}, outputs=[("video", "VIDEO")],
                      widgets=[("filename_prefix", ("STRING",)), ("format", ["auto", "mp4", "mkv", "webm"]),
                               ("format.codec", ["auto", "h264", "av1"]),
                               ("format.codec.encoding", ["auto", "re-encode"]), ("codec", ["auto", "h264", "av1"])]),
    "Note": dict(inputs={}, required=set(), outputs=[], widgets=[("text", ("STRING",))], virtual=True),
    "LoadImage": dict(inputs={}, required=set(), outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                      widgets=[("image", ["example.png"]), ("upload", ["image"])]),
    "KSamplerSelect": dict(inputs={}, required=set(), outputs=[("SAMPLER", "SAMPLER")],
                           widgets=[("sampler_name", ["euler", "uni_pc", "dpmpp_2m", "res_multistep"])]),
    "CFGGuider": dict(inputs={"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING"},
                      required={"model", "positive", "negative"}, outputs=[("GUIDER", "GUIDER")],
                      widgets=[("cfg", ("FLOAT", 0.0, 100.0))]),
    "SamplerCustomAdvanced": dict(inputs={"noise": "NOISE", "guider": "GUIDER", "sampler": "SAMPLER",
                                          "sigmas": "SIGMAS", "latent_image": "LATENT"},
                                  required={"noise", "guider", "sampler", "sigmas", "latent_image"},
                                  outputs=[("output", "LATENT"), ("denoised_output", "LATENT")], widgets=[]),
}
# Model-file combos list what is installed; the workflows use the names the README documents.
MODEL_FILE_INPUTS = {("StepVideoModelLoader", "model"), ("StepVideoNativeModelLoader", "model"), ("StepVideoTextEncoderLoader", "step_llm"),
                     ("StepVideoTextEncoderLoader", "hunyuan_clip"), ("StepVideoVAELoader", "vae_name"),
                     ("StepVideoLoraLoader", "lora_name")}


def load(name: str, api: bool = False) -> dict:
    return json.loads((WORKFLOWS / ("api" if api else "") / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture
def documented_models(models_dir):
    """The README's model layout, with empty placeholder files (the combos only look at names and folders)."""
    release = models_dir / "diffusion_models" / "stepvideo-t2v"
    for folder in (release / "transformer", models_dir / "diffusion_models" / "stepvideo-t2v-turbo" / "transformer",
                   models_dir / "diffusion_models" / "stepvideo-ti2v" / "transformer"):
        folder.mkdir(parents=True)
        for file in ("config.json", "diffusion_pytorch_model.safetensors.index.json"):
            (folder / file).touch()
    for release_name in ("stepvideo-t2v", "stepvideo-ti2v"):
        text = models_dir / "text_encoders" / release_name
        for folder in ("step_llm", "hunyuan_clip/clip_text_encoder", "hunyuan_clip/tokenizer"):
            (text / folder).mkdir(parents=True)
        for file in ("config.json", "model.safetensors.index.json", "step1_chat_tokenizer.model"):
            (text / "step_llm" / file).touch()
    (models_dir / "vae" / "stepvideo").mkdir()
    (models_dir / "vae" / "stepvideo" / "vae_v2.safetensors").touch()
    return models_dir


def pack_classes(pack) -> dict:
    """Every node the pack offers inside ComfyUI (outside it, the native family is not registered)."""
    native = importlib.import_module(f"{pack.__name__}.nodes.native")
    return {**{i: cls for i, (cls, _) in native.NATIVE_NODES.items()}, **pack.NODE_CLASS_MAPPINGS}


def schema(pack, node_type: str) -> dict:
    """Sockets (name -> type, in order), required sockets, outputs [(name, type)] and widgets [(name, spec)]."""
    if node_type in CORE:
        return CORE[node_type]
    classes = pack_classes(pack)
    assert node_type in classes, f"unknown node type {node_type}"
    cls = classes[node_type]
    inputs, required, widgets = {}, set(), []
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                widgets.append((name, kind))
            elif kind in WIDGET_TYPES and not opts.get("forceInput"):
                widgets.append((name, (kind, opts.get("min"), opts.get("max"))))
                if opts.get("control_after_generate"):
                    widgets.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"]))
            else:
                inputs[name] = kind
                if section == "required":
                    required.add(name)
    outputs = list(zip(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), cls.RETURN_TYPES))
    return dict(inputs=inputs, required=required, outputs=outputs, widgets=widgets)


def check_value(node_type: str, name: str, spec, value) -> None:
    """Raise AssertionError unless ``value`` is valid for a widget of ``spec`` (options list or (type, min, max))."""
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(spec, list):
        if (node_type, name) not in MODEL_FILE_INPUTS:
            assert value in spec, f"{where} not in {spec}"
        return
    kind = spec[0]
    if kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), where
        if kind == "INT":
            assert isinstance(value, int), where
        low, high = spec[1], spec[2]
        assert (low is None or value >= low) and (high is None or value <= high), f"{where} outside [{low}, {high}]"


def test_every_workflow_has_its_api_twin():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == sorted(NAMES)


def test_files_are_what_build_py_writes(pack):
    spec = importlib.util.spec_from_file_location("workflows_build", WORKFLOWS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for path, text in build.rendered_files(pack).items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run python workflows/build.py"


@pytest.mark.parametrize("name", NAMES)
def test_ui_graph_is_valid_for_the_pack(pack, documented_models, name):
    wf = load(name)
    assert wf["version"] == 0.4 and {"id", "revision", "groups", "config", "extra"} <= set(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    schemas = {i: schema(pack, n["type"]) for i, n in nodes.items()}
    for link_id, src, src_slot, dst, dst_slot, link_type in wf["links"]:
        out_name, out_type = schemas[src]["outputs"][src_slot]
        socket = nodes[dst]["inputs"][dst_slot]
        assert out_type == link_type == socket["type"] == schemas[dst]["inputs"][socket["name"]], link_id
        assert socket["link"] == link_id and link_id in nodes[src]["outputs"][src_slot]["links"]
    for i, node in nodes.items():
        sch = schemas[i]
        assert [s["name"] for s in node["inputs"]] == list(sch["inputs"]), node["type"]
        assert [o["type"] for o in node["outputs"]] == [t for _, t in sch["outputs"]], node["type"]
        for socket in node["inputs"]:
            assert socket["link"] is not None or socket["name"] not in sch["required"], socket["name"]
        widgets = sch["widgets"]
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        assert node["widgets_values_named"] == dict(zip([w for w, _ in widgets], node["widgets_values"]))
        for (widget, spec), value in zip(widgets, node["widgets_values"]):
            check_value(node["type"], widget, spec, value)
        if node["type"] in pack_classes(pack):
            assert node["properties"]["Node name for S&R"] == node["type"]
            live = dict(pack_classes(pack)[node["type"]].INPUT_TYPES()["required"])
            for widget, value in node["widgets_values_named"].items():
                if (node["type"], widget) in MODEL_FILE_INPUTS:
                    assert value in live[widget][0], f"{widget} {value!r} not found in the documented layout"


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_the_same_graph(pack, name):
    wf, api = load(name), load(name, api=True)
    nodes = {str(n["id"]): n for n in wf["nodes"] if not CORE.get(n["type"], {}).get("virtual")}
    assert set(api) == set(nodes)
    for nid, entry in api.items():
        node = nodes[nid]
        assert entry["class_type"] == node["type"] and entry["_meta"]["title"]
        expected = {w: v for w, v in node["widgets_values_named"].items()
                    if w != "control_after_generate" and (node["type"], w) != ("LoadImage", "upload")}  # UI-only
        for link_id, src, src_slot, dst, dst_slot, _ in wf["links"]:
            if str(dst) == nid:
                expected[node["inputs"][dst_slot]["name"]] = [str(src), src_slot]
        assert entry["inputs"] == expected, nid


def widgets(name: str) -> dict:
    """node type -> widget values by name (each type appears once per graph)."""
    return {n["type"]: n["widgets_values_named"] for n in load(name)["nodes"]}


@pytest.mark.parametrize("name,preset", [("stepvideo_t2v", "Step-Video-T2V"), ("stepvideo_t2v_turbo",
                                                                               "Step-Video-T2V-Turbo"),
                                         ("stepvideo_t2v_24gb", "Step-Video-T2V"), ("stepvideo_ti2v", "Step-Video-TI2V")])
def test_sampler_uses_the_preset_and_a_valid_size(name, preset):
    s = widgets(name)["StepVideoSampler"]
    p = PRESETS[preset]
    assert s["preset"] == preset and (s["steps"], s["cfg"], s["shift"]) == (p.steps, p.cfg, p.shift)
    assert resolve_settings(preset, s["steps"], s["cfg"], s["shift"]) == dict(steps=p.steps, cfg=p.cfg, shift=p.shift)
    assert (s["width"], s["height"], s["frames"]) == (992, 544, p.frames)
    check_video_size(s["width"], s["height"], s["frames"])


def test_the_ti2v_workflow_is_the_official_image_to_video_run():
    """Official TI2V settings (reference stepvideo-ti2v.md section 3): 102 frames, motion score 5, its own magic
    prompts, the image condition made for the sampler's size from a Load Image, and the TI2V release's files."""
    from stepvideo_core.text.encoder import TI2V_NEGATIVE_PROMPT

    wf = widgets("stepvideo_ti2v")
    sampler, image = wf["StepVideoSampler"], wf["StepVideoImageToVideo"]
    assert (sampler["frames"], image["motion_score"]) == (102, 5.0)
    assert {k: image[k] for k in ("width", "height", "frames")} == {k: sampler[k] for k in ("width", "height", "frames")}
    assert wf["StepVideoTextEncode"]["add_magic"] and wf["StepVideoTextEncode"]["magic"] == "Step-Video-TI2V"
    assert wf["StepVideoNegativeTextEncode"] == {"prompt": TI2V_NEGATIVE_PROMPT, "official": "Step-Video-TI2V"}
    assert wf["StepVideoModelLoader"]["model"] == "stepvideo-ti2v"
    assert wf["StepVideoTextEncoderLoader"]["step_llm"] == wf["StepVideoTextEncoderLoader"]["hunyuan_clip"] == \
        "stepvideo-ti2v"
    graph = load("stepvideo_ti2v")
    types = {n["id"]: n["type"] for n in graph["nodes"]}
    linked = {(types[link[1]], types[link[3]]) for link in graph["links"]}
    assert {("LoadImage", "StepVideoImageToVideo"), ("StepVideoImageToVideo", "StepVideoSampler"),
            ("StepVideoVAELoader", "StepVideoImageToVideo")} <= linked
    for where in ("models/diffusion_models/stepvideo-ti2v/", "models/text_encoders/stepvideo-ti2v/"):
        assert where in wf["Note"]["text"]


def test_each_workflow_does_its_job():
    base, turbo, small = widgets("stepvideo_t2v"), widgets("stepvideo_t2v_turbo"), widgets("stepvideo_t2v_24gb")
    assert base["StepVideoSampler"]["steps"] == 50 and base["StepVideoSampler"]["cfg"] == 9
    assert turbo["StepVideoSampler"]["steps"] == 15 and turbo["StepVideoSampler"]["shift"] == 17
    assert turbo["StepVideoModelLoader"]["model"] == "stepvideo-t2v-turbo"
    assert turbo["StepVideoTextEncoderLoader"]["step_llm"] == turbo["StepVideoTextEncoderLoader"]["hunyuan_clip"] == \
        "stepvideo-t2v" and turbo["StepVideoVAELoader"]["vae_name"] == "stepvideo/vae_v2.safetensors"
    assert "only the transformer" in turbo["Note"]["text"]
    assert small["StepVideoModelLoader"]["weight_dtype"] == "fp8_scaled"
    assert small["StepVideoModelLoader"]["blocks_on_device"] == "auto"
    assert small["StepVideoTextEncoderLoader"]["device_plan"] in ("auto", "stream")
    for wf in (base, turbo, small):
        assert wf["StepVideoNegativeTextEncode"]["prompt"] == NEGATIVE_PROMPT and wf["StepVideoTextEncode"]["add_magic"]
        assert wf["CreateVideo"]["fps"] == 25
        assert (wf["SaveVideo"]["format"], wf["SaveVideo"]["format.codec"]) == ("mp4", "h264")
        note = wf["Note"]["text"]
        for where in ("models/diffusion_models/", "models/text_encoders/", "models/vae/stepvideo/vae_v2.safetensors"):
            assert where in note


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_twin_runs_the_one_node_workflows_settings(name):
    """Same models, prompts, seed, size, steps, cfg and shift as its one-node twin, on the official schedule
    and the pack's noise (the two nodes that make core sampling give the one-node path's video)."""
    native, twin = widgets(name), widgets(NATIVE[name])
    sampler = twin["StepVideoSampler"]
    assert native["StepVideoEmptyLatent"] == dict(width=sampler["width"], height=sampler["height"],
                                                  frames=sampler["frames"], batch_size=1)
    assert (native["StepVideoScheduler"]["steps"], native["StepVideoScheduler"]["shift"]) == (sampler["steps"],
                                                                                             sampler["shift"])
    assert native["StepVideoScheduler"]["denoise"] == 1.0 and native["CFGGuider"]["cfg"] == sampler["cfg"]
    assert native["StepVideoNoise"]["noise_seed"] == sampler["seed"]
    assert native["KSamplerSelect"]["sampler_name"] == "euler"  # the official solver
    for key in ("model", "weight_dtype", "attention"):
        assert native["StepVideoNativeModelLoader"][key] == twin["StepVideoModelLoader"][key]
    assert native["StepVideoTextEncoderLoader"] == twin["StepVideoTextEncoderLoader"]
    assert native["StepVideoVAELoader"] == twin["StepVideoVAELoader"]
    assert native["StepVideoNativeTextEncode"] == twin["StepVideoTextEncode"]
    assert native["StepVideoNegativeTextEncode"] == twin["StepVideoNegativeTextEncode"]
    assert native["SaveVideo"]["filename_prefix"] == twin["SaveVideo"]["filename_prefix"] + "_native"


def test_the_24gb_native_workflow_releases_the_text_encoder():
    graph = {n["type"]: n for n in load("stepvideo_t2v_24gb_native")["nodes"]}
    links = {link[0]: link for link in load("stepvideo_t2v_24gb_native")["links"]}
    memory = graph["StepVideoTextEncoderMemory"]
    assert memory["widgets_values_named"] == {"keep_in_ram": False}
    for encoder in ("StepVideoNativeTextEncode", "StepVideoNegativeTextEncode"):
        (socket,) = [s for s in graph[encoder]["inputs"] if s["name"] == "text_encoder"]
        assert links[socket["link"]][1] == memory["id"], encoder
    assert "StepVideoTextEncoderMemory" not in widgets("stepvideo_t2v_native")


def test_model_names_are_documented_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        for node_type, values in widgets(name).items():
            for widget, value in values.items():
                if (node_type, widget) in MODEL_FILE_INPUTS:
                    assert value in readme, f"{value!r} ({name}) is not in the README"
