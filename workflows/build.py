"""Writes the shipped example workflows, UI format and API twin, from one description.

    python workflows/build.py           # (re)write workflows/*.json and workflows/api/*.json
    python workflows/build.py --check   # exit 1 when a file differs from what would be written

Each workflow is a list of nodes with their widget values *by name* and their links
*by input name*.  The positional ``widgets_values`` of the UI format and the
``inputs`` of the API format are both derived from the node definitions: the
pack's own ``INPUT_TYPES`` (imported the way ComfyUI imports the pack) and, for
the three core nodes used, :data:`CORE_NODES`, copied from ComfyUI v0.33 and its
frontend 1.49.6 (which writes SaveVideo's nested format/codec widgets flat, as
below).  So the two formats cannot drift apart, and a renamed or reordered
widget shows up as a failing ``tests/test_workflows.py`` instead of a broken
workflow.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACK_MODULE = "stepvideo_workflow_build"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
OPTIONAL_SHAPE = 7  # LiteGraph's slot shape for optional inputs (the frontend writes "shape": 7)

# Core ComfyUI nodes the workflows use: sockets (name, type, optional) and widgets in UI order
# (name, spec).  A spec is a type name with min/max or a list of options; "virtual" nodes
# (Note) exist only in the UI format.
CORE_NODES = {
    "CreateVideo": {
        "title": "Create Video",
        "inputs": [("images", "IMAGE", False), ("audio", "AUDIO", True)],
        "outputs": [("VIDEO", "VIDEO")],
        "widgets": [("fps", {"type": "FLOAT", "min": 1.0, "max": 120.0, "default": 30.0}),
                    ("bit_depth", {"type": "INT", "min": 8, "max": 10, "default": 8})],
    },
    "SaveVideo": {
        "title": "Save Video",
        "inputs": [("video", "VIDEO", False)],
        "outputs": [("video", "VIDEO")],
        "widgets": [("filename_prefix", {"type": "STRING", "default": "video/ComfyUI"}),
                    ("format", {"options": ["auto", "mp4", "mkv", "webm"]}),
                    ("format.codec", {"options": ["auto", "h264", "av1"]}),
                    ("format.codec.encoding", {"options": ["auto", "re-encode"], "default": "auto"}),
                    ("codec", {"options": ["auto", "h264", "av1"], "default": "auto"})],
    },
    "Note": {"title": "Note", "virtual": True, "inputs": [], "outputs": [],
             "widgets": [("text", {"type": "STRING", "default": ""})]},
    # nodes.py of v0.33; the frontend adds the upload button as a second widget, value "image".
    "LoadImage": {
        "title": "Load Image",
        "inputs": [],
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
        "widgets": [("image", {"options": ["example.png"]}),   # ComfyUI's input/ ships example.png
                    ("upload", {"options": ["image"], "default": "image", "ui_only": True})],
    },
    # The native workflows' sampling: comfy_extras/nodes_custom_sampler.py of v0.33.
    "KSamplerSelect": {
        "title": "KSamplerSelect",
        "inputs": [],
        "outputs": [("SAMPLER", "SAMPLER")],
        "widgets": [("sampler_name", {"options": [
            "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
            "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
            "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
            "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
            "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
            "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
            "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim",
            "uni_pc", "uni_pc_bh2"]})],
    },
    "CFGGuider": {
        "title": "CFG Guider",
        "inputs": [("model", "MODEL", False), ("positive", "CONDITIONING", False),
                   ("negative", "CONDITIONING", False)],
        "outputs": [("GUIDER", "GUIDER")],
        "widgets": [("cfg", {"type": "FLOAT", "min": 0.0, "max": 100.0, "default": 8.0})],
    },
    "SamplerCustomAdvanced": {
        "title": "SamplerCustomAdvanced",
        "inputs": [("noise", "NOISE", False), ("guider", "GUIDER", False), ("sampler", "SAMPLER", False),
                   ("sigmas", "SIGMAS", False), ("latent_image", "LATENT", False)],
        "outputs": [("output", "LATENT"), ("denoised_output", "LATENT")],
        "widgets": [],
    },
}
CONTROL_AFTER_GENERATE = ("fixed", "increment", "decrement", "randomize")

PROMPT = ("A red fox trots through fresh snow in a quiet birch forest at dawn; soft golden light, "
          "slow tracking shot, breath visible in the cold air.")
FILES_T2V = """\
Model files: the official stepvideo-t2v release (stepfun-ai/stepvideo-t2v), folders kept as downloaded.

ComfyUI/models/diffusion_models/stepvideo-t2v/   the release folder (at least transformer/)
ComfyUI/models/text_encoders/stepvideo-t2v/      the same folder, or one holding step_llm/ and hunyuan_clip/
ComfyUI/models/vae/stepvideo/vae_v2.safetensors  vae/vae_v2.safetensors of the release

One download is enough: link the release folder into diffusion_models/ and text_encoders/."""


def import_pack():
    """The repository root imported as a package, as ComfyUI imports a custom node pack."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def pack_node_classes(pack) -> dict:
    """Node id -> class of every node the pack offers inside ComfyUI.

    Imported here without ComfyUI, the pack registers all but its native family (a ComfyUI ``MODEL``
    needs ComfyUI's model code); its classes are in :data:`nodes.native.NATIVE_NODES` all the same.
    """
    native = importlib.import_module(f"{pack.__name__}.nodes.native")
    classes = {node_id: cls for node_id, (cls, _) in native.NATIVE_NODES.items()}
    return {**classes, **pack.NODE_CLASS_MAPPINGS}


def node_title(pack, node_type: str) -> str:
    native = importlib.import_module(f"{pack.__name__}.nodes.native")
    names = {node_id: name for node_id, (_, name) in native.NATIVE_NODES.items()}
    return {**names, **pack.NODE_DISPLAY_NAME_MAPPINGS}.get(node_type, node_type)


def node_schema(node_type: str, pack=None) -> dict:
    """Sockets and widgets of ``node_type`` in the shape of :data:`CORE_NODES` (pack nodes from INPUT_TYPES).

    Widget specs of pack nodes are their INPUT_TYPES options, with ``type`` set and, for
    combos, ``options``; an INT with ``control_after_generate`` is followed by the UI-only
    widget ``control_after_generate``.
    """
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    pack = pack or import_pack()
    cls = pack_node_classes(pack)[node_type]
    declared = cls.INPUT_TYPES()
    inputs, widgets = [], []
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
            if isinstance(kind, (list, tuple)):
                widgets.append((name, dict(options, options=list(kind))))
            elif kind in WIDGET_TYPES and not options.get("forceInput"):
                widgets.append((name, dict(options, type=kind)))
                if options.get("control_after_generate"):
                    widgets.append(("control_after_generate", {"options": list(CONTROL_AFTER_GENERATE),
                                                               "ui_only": True}))
            else:
                inputs.append((name, kind, section == "optional"))
    outputs = list(zip(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), cls.RETURN_TYPES))
    return {"title": node_title(pack, node_type), "inputs": inputs, "outputs": outputs, "widgets": widgets}


# --------------------------------------------------------------------------- the description

def graph(model: str, weight_dtype: str, blocks: str, device_plan: str, preset: str, note: str,
          prefix: str, seed: int = 1234) -> list[dict]:
    """The text-to-video graph every shipped workflow uses, with its per-workflow choices."""
    from stepvideo_core.sampling import PRESETS
    from stepvideo_core.text.encoder import NEGATIVE_PROMPT

    p = PRESETS[preset]
    return [
        dict(id=1, type="Note", pos=[40, 40], size=[560, 250], title="Read me: model files",
             widgets={"text": note}),
        dict(id=2, type="StepVideoModelLoader", pos=[40, 330], size=[360, 190],
             widgets={"model": model, "weight_dtype": weight_dtype, "attention": "sdpa", "blocks_on_device": blocks}),
        dict(id=3, type="StepVideoTextEncoderLoader", pos=[40, 570], size=[360, 180],
             widgets={"step_llm": "stepvideo-t2v", "hunyuan_clip": "stepvideo-t2v", "weight_dtype": "default",
                      "alibi": True, "device_plan": device_plan}),
        dict(id=4, type="StepVideoVAELoader", pos=[40, 790], size=[360, 90],
             widgets={"vae_name": "stepvideo/vae_v2.safetensors", "weight_dtype": "default"}),
        dict(id=5, type="StepVideoTextEncode", pos=[440, 330], size=[420, 220],
             widgets={"prompt": PROMPT, "add_magic": True}, links={"text_encoder": (3, 0)}),
        dict(id=6, type="StepVideoNegativeTextEncode", pos=[440, 590], size=[420, 200],
             widgets={"prompt": NEGATIVE_PROMPT}, links={"text_encoder": (3, 0)}),
        dict(id=7, type="StepVideoSampler", pos=[900, 330], size=[330, 390],
             widgets={"preset": preset, "width": 992, "height": 544, "frames": 204, "steps": p.steps,
                      "cfg": p.cfg, "shift": p.shift, "seed": seed, "control_after_generate": "fixed"},
             links={"model": (2, 0), "positive": (5, 0), "negative": (6, 0), "preview_vae": (4, 0)}),
        dict(id=8, type="StepVideoVAEDecode", pos=[1270, 330], size=[300, 110],
             widgets={"tile_size": 0, "tile_overlap": 8}, links={"vae": (4, 0), "samples": (7, 0)}),
        dict(id=9, type="CreateVideo", pos=[1270, 480], size=[300, 110],
             widgets={"fps": 25.0, "bit_depth": 8}, links={"images": (8, 0)}),
        dict(id=10, type="SaveVideo", pos=[1610, 330], size=[480, 130],
             widgets={"filename_prefix": prefix, "format": "mp4", "format.codec": "h264",
                      "format.codec.encoding": "auto", "codec": "auto"}, links={"video": (9, 0)}),
    ]


TI2V_PROMPT = ("The camera slowly pushes in; the subject comes to life with natural, gentle motion, soft light "
               "and a light breeze moving through the scene.")
FILES_TI2V = """\
Model files: the official stepvideo-ti2v release (stepfun-ai/stepvideo-ti2v), folders kept as downloaded.

ComfyUI/models/diffusion_models/stepvideo-ti2v/  the release folder (at least transformer/)
ComfyUI/models/text_encoders/stepvideo-ti2v/     the same folder (step_llm/ and hunyuan_clip/, the T2V ones)
ComfyUI/models/vae/stepvideo/vae_v2.safetensors  vae/vae_v2.safetensors of the release (the T2V VAE)

One download is enough: link the release folder into diffusion_models/ and text_encoders/."""


def ti2v_graph(note: str, prefix: str, seed: int = 1234) -> list[dict]:
    """The image-to-video graph: Load Image -> StepVideo Image to Video -> StepVideo Sampler (TI2V preset)."""
    from stepvideo_core.sampling import PRESETS, TI2V_PRESET
    from stepvideo_core.text.encoder import TI2V_NEGATIVE_PROMPT

    p = PRESETS[TI2V_PRESET]
    size = {"width": 992, "height": 544, "frames": p.frames}
    return [
        dict(id=1, type="Note", pos=[40, 40], size=[560, 250], title="Read me: model files",
             widgets={"text": note}),
        dict(id=2, type="StepVideoModelLoader", pos=[40, 330], size=[360, 190],
             widgets={"model": "stepvideo-ti2v", "weight_dtype": "auto", "attention": "sdpa",
                      "blocks_on_device": "auto"}),
        dict(id=3, type="StepVideoTextEncoderLoader", pos=[40, 570], size=[360, 180],
             widgets={"step_llm": "stepvideo-ti2v", "hunyuan_clip": "stepvideo-ti2v", "weight_dtype": "default",
                      "alibi": True, "device_plan": "auto"}),
        dict(id=4, type="StepVideoVAELoader", pos=[40, 790], size=[360, 90],
             widgets={"vae_name": "stepvideo/vae_v2.safetensors", "weight_dtype": "default"}),
        dict(id=5, type="LoadImage", pos=[40, 920], size=[360, 320], title="First frame",
             widgets={"image": "example.png", "upload": "image"}),
        dict(id=6, type="StepVideoTextEncode", pos=[440, 330], size=[420, 220],
             widgets={"prompt": TI2V_PROMPT, "add_magic": True, "magic": TI2V_PRESET}, links={"text_encoder": (3, 0)}),
        dict(id=7, type="StepVideoNegativeTextEncode", pos=[440, 590], size=[420, 200],
             widgets={"prompt": TI2V_NEGATIVE_PROMPT, "official": TI2V_PRESET}, links={"text_encoder": (3, 0)}),
        dict(id=8, type="StepVideoImageToVideo", pos=[440, 830], size=[420, 250],
             widgets={**size, "motion_score": p.motion_score, "seed": seed},
             links={"vae": (4, 0), "image": (5, 0)}),
        dict(id=9, type="StepVideoSampler", pos=[900, 330], size=[330, 410],
             widgets={"preset": TI2V_PRESET, **size, "steps": p.steps, "cfg": p.cfg, "shift": p.shift, "seed": seed,
                      "control_after_generate": "fixed"},
             links={"model": (2, 0), "positive": (6, 0), "negative": (7, 0), "preview_vae": (4, 0),
                    "image_condition": (8, 0)}),
        dict(id=10, type="StepVideoVAEDecode", pos=[1270, 330], size=[300, 110],
             widgets={"tile_size": 0, "tile_overlap": 8}, links={"vae": (4, 0), "samples": (9, 0)}),
        dict(id=11, type="CreateVideo", pos=[1270, 480], size=[300, 110],
             widgets={"fps": 25.0, "bit_depth": 8}, links={"images": (10, 0)}),
        dict(id=12, type="SaveVideo", pos=[1610, 330], size=[480, 130],
             widgets={"filename_prefix": prefix, "format": "mp4", "format.codec": "h264",
                      "format.codec.encoding": "auto", "codec": "auto"}, links={"video": (11, 0)}),
    ]


def native_graph(model: str, weight_dtype: str, device_plan: str, preset: str, note: str, prefix: str,
                 release_text_encoder: bool, seed: int = 1234) -> list[dict]:
    """The text-to-video graph on the native MODEL: ComfyUI's own sampling nodes, the pack's model parts.

    SamplerCustomAdvanced with the official schedule (StepVideo Scheduler) and the pack's seeded noise
    (StepVideo Noise), so a seed gives the same video as the one-node workflow; ``release_text_encoder``
    puts StepVideo Text Encoder Memory (unload after encode) between the text loader and the encoders.
    """
    from stepvideo_core.sampling import PRESETS
    from stepvideo_core.text.encoder import NEGATIVE_PROMPT

    p = PRESETS[preset]
    text_encoder = (12, 0) if release_text_encoder else (3, 0)
    nodes = [
        dict(id=1, type="Note", pos=[40, 40], size=[560, 250], title="Read me: model files",
             widgets={"text": note}),
        dict(id=2, type="StepVideoNativeModelLoader", pos=[40, 330], size=[360, 130],
             widgets={"model": model, "weight_dtype": weight_dtype, "attention": "sdpa"}),
        dict(id=3, type="StepVideoTextEncoderLoader", pos=[40, 510], size=[360, 180],
             widgets={"step_llm": "stepvideo-t2v", "hunyuan_clip": "stepvideo-t2v", "weight_dtype": "default",
                      "alibi": True, "device_plan": device_plan}),
        dict(id=4, type="StepVideoVAELoader", pos=[40, 890], size=[360, 90],
             widgets={"vae_name": "stepvideo/vae_v2.safetensors", "weight_dtype": "default"}),
        dict(id=5, type="StepVideoNativeTextEncode", pos=[440, 330], size=[420, 220],
             widgets={"prompt": PROMPT, "add_magic": True}, links={"text_encoder": text_encoder}),
        dict(id=6, type="StepVideoNegativeTextEncode", pos=[440, 590], size=[420, 200],
             widgets={"prompt": NEGATIVE_PROMPT}, links={"text_encoder": text_encoder}),
        dict(id=7, type="StepVideoNativeConditioning", pos=[440, 830], size=[300, 50], links={"conditioning": (6, 0)}),
        dict(id=8, type="StepVideoEmptyLatent", pos=[900, 330], size=[300, 130],
             widgets={"width": 992, "height": 544, "frames": 204, "batch_size": 1}),
        dict(id=9, type="StepVideoScheduler", pos=[900, 500], size=[300, 110],
             widgets={"steps": p.steps, "shift": p.shift, "denoise": 1.0}),
        dict(id=10, type="StepVideoNoise", pos=[900, 650], size=[300, 90],
             widgets={"noise_seed": seed, "control_after_generate": "fixed"}),
        dict(id=11, type="KSamplerSelect", pos=[900, 780], size=[300, 60], widgets={"sampler_name": "euler"}),
        dict(id=13, type="CFGGuider", pos=[1240, 330], size=[300, 100], widgets={"cfg": p.cfg},
             links={"model": (2, 0), "positive": (5, 0), "negative": (7, 0)}),
        dict(id=14, type="SamplerCustomAdvanced", pos=[1240, 470], size=[300, 120],
             links={"noise": (10, 0), "guider": (13, 0), "sampler": (11, 0), "sigmas": (9, 0),
                    "latent_image": (8, 0)}),
        dict(id=15, type="StepVideoVAEDecode", pos=[1580, 330], size=[300, 110],
             widgets={"tile_size": 0, "tile_overlap": 8}, links={"vae": (4, 0), "samples": (14, 0)}),
        dict(id=16, type="CreateVideo", pos=[1580, 480], size=[300, 110],
             widgets={"fps": 25.0, "bit_depth": 8}, links={"images": (15, 0)}),
        dict(id=17, type="SaveVideo", pos=[1920, 330], size=[480, 130],
             widgets={"filename_prefix": prefix, "format": "mp4", "format.codec": "h264",
                      "format.codec.encoding": "auto", "codec": "auto"}, links={"video": (16, 0)}),
    ]
    if release_text_encoder:
        nodes.append(dict(id=12, type="StepVideoTextEncoderMemory", pos=[40, 740], size=[360, 80],
                          widgets={"keep_in_ram": False}, links={"text_encoder": (3, 0)}))
    return sorted(nodes, key=lambda n: n["id"])


NATIVE_NOTE = ("The same model files as stepvideo_t2v.json; this graph runs the DiT as a ComfyUI MODEL, so "
               "ComfyUI's own sampling nodes drive it: swap KSamplerSelect's sampler, put EasyCache or "
               "LoraLoaderModelOnly after the model loader, or use KSampler instead (its schedulers space the "
               "steps differently from the official schedule). StepVideo Scheduler and StepVideo Noise make it "
               "the official run: with the same seed it gives the video of stepvideo_t2v.json.")


def workflows() -> dict:
    """name -> node list, for every shipped workflow."""
    return {
        "stepvideo_t2v": graph(
            "stepvideo-t2v", "auto", "auto", "auto", "Step-Video-T2V", prefix="video/stepvideo_t2v",
            note="Step-Video-T2V with the official settings: 50 steps, cfg 9, shift 13, 992x544, 204 frames "
                 "(8 s at 25 fps).\n\n" + FILES_T2V + "\n\nbf16 weights: about 60 GB of RAM for the DiT and 39 GB "
                 "for the Step-LLM; blocks that do not fit on the GPU are streamed (blocks_on_device auto). "
                 "For a 24 GB card use stepvideo_t2v_24gb.json."),
        "stepvideo_t2v_turbo": graph(
            "stepvideo-t2v-turbo", "auto", "auto", "auto", "Step-Video-T2V-Turbo",
            prefix="video/stepvideo_t2v_turbo",
            note="Step-Video-T2V-Turbo (step-distilled): its preset is 15 steps, cfg 5, shift 17.\n\n"
                 "The Turbo repository (stepfun-ai/stepvideo-t2v-turbo) has only the transformer:\n"
                 "ComfyUI/models/diffusion_models/stepvideo-t2v-turbo/   holding its transformer/ folder\n\n"
                 "The VAE and the text encoders come from the base release, as in stepvideo_t2v.json:\n\n"
                 + FILES_T2V.split("\n\n", 1)[1]),
        "stepvideo_t2v_24gb": graph(
            "stepvideo-t2v", "fp8_scaled", "auto", "stream", "Step-Video-T2V", prefix="video/stepvideo_t2v_24gb",
            note="Step-Video-T2V on a 24 GB GPU: the DiT's block weights in fp8 with per-channel scales (weight_dtype "
                 "fp8_scaled, quantised while loading the bf16 release: about 30 GB of RAM instead of 60; the Step-LLM "
                 "takes 39 GB more), as many "
                 "blocks on the GPU as fit and the rest streamed from RAM (blocks_on_device auto, planned per run), "
                 "and the 19.6B Step-LLM streamed to the GPU one layer at a time (device_plan stream).\n\n"
                 + FILES_T2V + "\n\nA pre-quantised file loads the same way: python -m stepvideo_core.convert "
                 "<release folder> models/diffusion_models/stepvideo-t2v-fp8_scaled.safetensors, then pick it "
                 "in the model loader. If the VAE decode runs out of memory, set its tile_size (e.g. 16)."),
        "stepvideo_ti2v": ti2v_graph(
            prefix="video/stepvideo_ti2v",
            note="Step-Video-TI2V (image-to-video) with the official settings: the first frame from Load Image, "
                 "motion score 5 (2 steadier, 10-20 more motion), 50 steps, cfg 9, shift 13, 992x544, 102 frames "
                 "(about 4 s at 25 fps), the TI2V prompt suffix and negative prompt.\n\n" + FILES_TI2V + "\n\n"
                 "The image is resized to cover 992x544 and centre-cropped. bf16 weights: about 60 GB of RAM for the "
                 "DiT and 39 GB for the Step-LLM; blocks that do not fit on the GPU are streamed (blocks_on_device "
                 "auto). On a 24 GB card set the model loader's weight_dtype to fp8_scaled and the text encoder's "
                 "device_plan to stream, as in stepvideo_t2v_24gb.json."),
        "stepvideo_t2v_native": native_graph(
            "stepvideo-t2v", "auto", "auto", "Step-Video-T2V", prefix="video/stepvideo_t2v_native",
            release_text_encoder=False,
            note="Step-Video-T2V on ComfyUI's own samplers (the native MODEL): 50 steps, cfg 9, shift 13, "
                 "992x544, 204 frames.\n\n" + NATIVE_NOTE + "\n\n" + FILES_T2V + "\n\nComfyUI loads the DiT: "
                 "what does not fit the GPU stays in RAM and is copied in layer by layer."),
        "stepvideo_t2v_24gb_native": native_graph(
            "stepvideo-t2v", "fp8_scaled", "stream", "Step-Video-T2V", prefix="video/stepvideo_t2v_24gb_native",
            release_text_encoder=True,
            note="Step-Video-T2V on a 24 GB GPU with ComfyUI's own samplers: the DiT's block weights in fp8 with "
                 "per-channel scales (about 30 GB of RAM; ComfyUI keeps on the GPU what fits and copies the rest in "
                 "layer by layer), the Step-LLM streamed to the GPU one layer at a time (device_plan stream) and "
                 "dropped from RAM after encoding (StepVideo Text Encoder Memory), so it does not sit beside the DiT "
                 "while it samples.\n\n" + NATIVE_NOTE + "\n\n" + FILES_T2V + "\n\nIf the VAE decode runs out "
                 "of memory, set its tile_size (e.g. 16)."),
    }


# --------------------------------------------------------------------------- rendering

def widget_values(node: dict, schema: dict) -> list[tuple[str, object]]:
    """(name, value) for every widget of ``node`` in UI order; defaults fill what the description leaves out."""
    given = dict(node.get("widgets", {}))
    out = []
    for name, spec in schema["widgets"]:
        if name in given:
            out.append((name, given.pop(name)))
        elif "default" in spec:
            out.append((name, spec["default"]))
        else:
            raise ValueError(f"node {node['id']} ({node['type']}): no value for widget {name!r}")
    if given:
        raise ValueError(f"node {node['id']} ({node['type']}): unknown widgets {sorted(given)}")
    return out


def execution_order(nodes: list[dict]) -> dict:
    """id -> position in a topological order (ties broken by id), as the frontend's ``order``."""
    pending = {n["id"]: {src for src, _ in n.get("links", {}).values()} for n in nodes}
    order = {}
    while pending:
        ready = sorted(i for i, deps in pending.items() if not deps - set(order))
        if not ready:
            raise ValueError(f"cycle among nodes {sorted(pending)}")
        for i in ready:
            order[i] = len(order)
            del pending[i]
    return order


def render(name: str, nodes: list[dict], pack=None) -> tuple[dict, dict]:
    """(UI-format workflow, API-format prompt) for one description."""
    schemas = {n["id"]: node_schema(n["type"], pack) for n in nodes}
    by_id = {n["id"]: n for n in nodes}
    order = execution_order(nodes)
    links, outgoing = [], {}
    for node in nodes:  # link ids in node order, then in the order of the node's sockets
        sockets = [s[0] for s in schemas[node["id"]]["inputs"]]
        for input_name in sorted(node.get("links", {}), key=sockets.index):
            src, slot = node["links"][input_name]
            link_type = schemas[src]["outputs"][slot][1]
            link_id = len(links) + 1
            links.append([link_id, src, slot, node["id"], sockets.index(input_name), link_type])
            outgoing.setdefault((src, slot), []).append(link_id)
    ui_nodes, api = [], {}
    for node in nodes:
        nid, schema = node["id"], schemas[node["id"]]
        values = widget_values(node, schema)
        incoming = {link[4]: link[0] for link in links if link[3] == nid}
        inputs = []
        for index, (sock, kind, optional) in enumerate(schema["inputs"]):
            entry = {"name": sock, "type": kind, "link": incoming.get(index)}
            if optional:
                entry["shape"] = OPTIONAL_SHAPE
            inputs.append(entry)
        outputs = [{"name": out_name, "type": kind, "links": outgoing.get((nid, slot)) or None, "slot_index": slot}
                   for slot, (out_name, kind) in enumerate(schema["outputs"])]
        ui = {"id": nid, "type": node["type"], "pos": node["pos"], "size": node["size"], "flags": {},
              "order": order[nid], "mode": 0, "inputs": inputs, "outputs": outputs,
              "properties": {} if schema.get("virtual") else {"Node name for S&R": node["type"]},
              "widgets_values": [v for _, v in values], "widgets_values_named": dict(values)}
        if node.get("title"):
            ui["title"] = node["title"]
        if schema.get("virtual"):
            ui.update(color="#432", bgcolor="#653")
        ui_nodes.append(ui)
        if schema.get("virtual"):
            continue
        ui_only = {w for w, spec in schema["widgets"] if spec.get("ui_only")}
        api_inputs = {w: v for w, v in values if w not in ui_only}
        api_inputs.update({sock: [str(by_id[src]["id"]), slot] for sock, (src, slot) in node.get("links", {}).items()})
        api[str(nid)] = {"inputs": api_inputs, "class_type": node["type"],
                         "_meta": {"title": node.get("title") or schema["title"]}}
    workflow = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"ComfyUI-StepVideo/workflows/{name}")), "revision": 0,
                "last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}
    return workflow, api


def rendered_files(pack=None) -> dict:
    """Path -> file text for every workflow file (UI in workflows/, API twin in workflows/api/)."""
    files = {}
    for name, nodes in workflows().items():
        ui, api = render(name, nodes, pack)
        files[HERE / f"{name}.json"] = json.dumps(ui, indent=2, ensure_ascii=False) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(api, indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is out of date")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # stepvideo_core as a top-level package, for presets and prompts
    stale = []
    for path, text in rendered_files().items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(REPO)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
