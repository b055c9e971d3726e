"""The computed figures of the README and docs/memory.md, from the pack's own functions (no GPU, no weights).

    python bench/figures.py sizes       # weight sizes of the released models (meta-device builds)
    python bench/figures.py vram        # plan, peak and rough time per card (the VRAM guidance table)
    python bench/figures.py vram --model ti2v
    python bench/figures.py workflows   # the README's hardware table: GPU and host RAM per shipped workflow
    COMFYUI_DIR=../shared/comfyui/ComfyUI .venv-comfy/bin/python bench/figures.py order
                                       # the order ComfyUI runs each shipped API graph's nodes in (a fresh
                                       # server per graph, tiny models, as in the e2e tests; observed)

Everything printed is computed, not measured: sizes from the architectures built on the meta device
(``build_transformer`` / ``build_step_llm`` / ``build_vae``) and the planner's ``weight_bytes``; plans from
``auto_plan`` (what the sampler's ``blocks_on_device`` auto picks); times from the plan route's own
estimate (``nodes/routes.py``: the FLOP count at half the datasheet BF16 rate, streamed blocks at an
assumed 20 GB/s); host RAM as the sum of the weights that rest in RAM at each point of a workflow.
HunyuanCLIP is a transformers BertModel (24 layers, width 1024) whose vocabulary the pack does not
fix; 47,020 tokens (the release's tokenizer) is assumed here: 1.41 GB in fp32.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB, GiB = 1e9, 2 ** 30
CARDS = (("24 GB, RTX 4090", "NVIDIA GeForce RTX 4090", 22.5), ("48 GB, L40S", "NVIDIA L40S", 46.5),
         ("80 GB, H100 SXM", "NVIDIA H100 80GB HBM3", 78.5))


def pack_routes():
    """The pack imported as ComfyUI imports it (relative imports), for the plan route's time estimate."""
    spec = importlib.util.spec_from_file_location("stepvideo_pack_docs", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return sys.modules[f"{spec.name}.nodes.routes"]


def dit_config(model: str) -> dict:
    from stepvideo_core.dit import StepVideoDiTConfig
    return StepVideoDiTConfig(use_additional_conditions=model == "ti2v").to_dict()


def dit_bytes(fmt: str, model: str = "t2v") -> int:
    from stepvideo_core.offload.planner import weight_bytes
    w = weight_bytes(fmt, config=dit_config(model))
    return w["block"] * w["layers"] + w["non_block"]


def sizes() -> dict:
    """Bytes of each released component (DiT per format, Step-LLM bf16, HunyuanCLIP fp32, VAE bf16/fp32)."""
    import torch
    from stepvideo_core import build_step_llm, build_vae

    def count(module):
        return sum(p.numel() for p in module.parameters())

    llm = build_step_llm(None)
    vae = count(build_vae(None))
    from transformers import BertConfig, BertModel
    bert = BertConfig(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096, max_position_embeddings=512)
    with torch.device("meta"):
        clip = count(BertModel(bert))
    return {"dit_bf16": dit_bytes("bf16"), "dit_fp8": dit_bytes("fp8_scaled"),
            "ti2v_bf16": dit_bytes("bf16", "ti2v"), "ti2v_fp8": dit_bytes("fp8_scaled", "ti2v"),
            "llm_bf16": 2 * count(llm), "llm_fp32": 4 * count(llm), "llm_layer_bf16": 2 * count(llm.layers[0]),
            "clip_fp32": 4 * clip, "vae_bf16": 2 * vae, "vae_fp32": 4 * vae}


def plan_row(routes, card_name: str, free_gib: float, frames: int, weight_dtype: str, model: str = "t2v",
             preset: str = "Step-Video-T2V") -> dict:
    """The plan route's answer for an assumed card (the same code as ``GET /stepvideo/plan``)."""
    req = routes.parse_query({"frames": str(frames), "weight_dtype": weight_dtype, "free_gb": str(free_gib),
                              "preset": preset})
    device = {"type": "cuda", "name": card_name, "free_bytes": int(free_gib * GiB), "total_bytes": None}
    info = {"found": True, "config": dit_config(model), "stored_format": None, "name": model}
    return routes.build_plan(req, device, info)


def fmt_plan(r: dict) -> str:
    p = r["plan"]
    cfg = "" if p["blocks_on_device"] == 48 and p["batch_cfg"] else (", batched" if p["batch_cfg"] else ", CFG 1 by 1")
    t = r["time"]["seconds"] if r["time"] else None
    when = "" if t is None else (f", ≈ {t / 3600:.1f} h" if t >= 5400 else f", ≈ {t / 60:.0f} min")
    return f"{p['blocks_on_device']}/48{cfg}, {p['peak_bytes'] / GiB:.1f} GiB{when}"


def min_free_gib(frames: int, fmt: str, model: str = "t2v") -> float:
    """Least free VRAM (GiB, 0.1 steps) for which the automatic plan fits at 992x544."""
    from stepvideo_core.offload.planner import PlanInputs, auto_plan
    lo, hi = 1, 2000  # tenths of a GiB
    while lo < hi:
        mid = (lo + hi) // 2
        fits = auto_plan(PlanInputs(992, 544, frames, weight_format=fmt, config=dit_config(model)),
                         free_bytes=int(mid / 10 * GiB))["fits"]
        lo, hi = (lo, mid) if fits else (mid + 1, hi)
    return lo / 10


def cmd_sizes() -> None:
    s = sizes()
    for k, v in s.items():
        print(f"{k:<16} {v / GB:7.2f} GB  {v / GiB:7.2f} GiB")


def cmd_vram(model: str) -> None:
    routes = pack_routes()
    frames_list = (204, 51) if model == "t2v" else (102, 51)
    preset = "Step-Video-T2V" if model == "t2v" else "Step-Video-TI2V"
    print(f"| card (free VRAM) | frames | bf16 weights ({dit_bytes('bf16', model) / GB:.1f} GB of RAM) | "
          f"fp8_scaled weights ({dit_bytes('fp8_scaled', model) / GB:.1f} GB of RAM) |")
    print("|---|---|---|---|")
    for label, name, free in CARDS:
        for frames in frames_list:
            cells = [fmt_plan(plan_row(routes, name, free, frames, wd, model, preset)) for wd in ("default", "fp8_scaled")]
            print(f"| {label} ({free:g} GiB) | {frames} | {cells[0]} | {cells[1]} |")


# Host RAM per workflow: what rests in RAM at each point, in ComfyUI's execution order (text encoding
# runs before the DiT loader in every shipped graph; the native graphs load the VAE after sampling);
# decode adds the decoded frames (fp32 IMAGE, frames x 544 x 992 x 3 x 4 bytes).
WORKFLOWS = (  # file, model, frames, weights, preset, text encoder dropped after encoding, VAE loaded first
    ("stepvideo_t2v", "t2v", 204, "bf16", "Step-Video-T2V", False, True),
    ("stepvideo_t2v_turbo", "t2v", 204, "bf16", "Step-Video-T2V-Turbo", False, True),
    ("stepvideo_t2v_24gb", "t2v", 204, "fp8_scaled", "Step-Video-T2V", False, True),
    ("stepvideo_t2v_24gb + Text Encoder Memory off", "t2v", 204, "fp8_scaled", "Step-Video-T2V", True, True),
    ("stepvideo_ti2v", "ti2v", 102, "bf16", "Step-Video-TI2V", False, True),
    ("stepvideo_t2v_native", "t2v", 204, "bf16", "Step-Video-T2V", False, False),
    ("stepvideo_t2v_24gb_native", "t2v", 204, "fp8_scaled", "Step-Video-T2V", True, False),
)


def cmd_workflows() -> None:
    s = sizes()
    routes = pack_routes()
    text = s["llm_bf16"] + s["clip_fp32"]
    vae = s["vae_bf16"]  # bf16 on CUDA (the loader's default there)
    print("| workflow | min. free VRAM | 24 GB card (22.5 GiB free) | host RAM: encode / sample / decode |")
    print("|---|---|---|---|")
    for name, model, frames, fmt, preset, drop, vae_first in WORKFLOWS:
        dit = dit_bytes(fmt, model)
        encode = text + (vae if vae_first else 0)
        sample = (0 if drop else text) + dit + (vae if vae_first else 0)
        frames_bytes = frames * 544 * 992 * 3 * 4  # the decoded IMAGE frames, fp32
        decode = (0 if drop else text) + dit + vae + frames_bytes
        native = name.endswith("_native")
        wd = "fp8_scaled" if fmt == "fp8_scaled" else "default"
        gpu = ("ComfyUI's partial loading" if native else
               fmt_plan(plan_row(routes, CARDS[0][1], CARDS[0][2], frames, wd, model, preset)))
        least = "ComfyUI-managed" if native else f"{min_free_gib(frames, fmt, model):.1f} GiB"
        print(f"| {name} | {least} | {gpu} | "
              f"{encode / GB:.0f} / {sample / GB:.0f} / {decode / GB:.0f} GB |")


def cmd_order() -> None:
    """Run every workflows/api graph, shrunk, through a real ComfyUI (tiny models) and print the order of
    its ``executing`` messages: which loader runs when, so which weights are in RAM at each point.
    A fresh server per graph, so nothing is cached from another graph (a first run)."""
    import json
    import os
    import tempfile
    sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests")]
    from comfy_server import ComfyServer, make_base_dir
    from test_comfyui_server import tiny
    from stepvideo_core.tiny import cached_tiny_release
    release, _ = cached_tiny_release()
    for f in sorted((ROOT / "workflows" / "api").glob("*.json")):
        base = make_base_dir(Path(tempfile.mkdtemp()) / "base", release)
        server = ComfyServer(Path(os.environ["COMFYUI_DIR"]), base, python=sys.executable).start()
        try:
            prompt = tiny(json.loads(f.read_text()))
            result = server.run(prompt)
            order = [m["node"] for m in result.of_type("executing") if m.get("node")]
            print(f.stem, result.status, " -> ".join(prompt[n]["class_type"] for n in order), flush=True)
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("sizes", "vram", "workflows", "order"))
    parser.add_argument("--model", choices=("t2v", "ti2v"), default="t2v")
    args = parser.parse_args()
    {"sizes": cmd_sizes, "vram": lambda: cmd_vram(args.model), "workflows": cmd_workflows, "order": cmd_order}[args.what]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
