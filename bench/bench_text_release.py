"""Host RAM of the text encoder with and without release after encoding, through the pack's nodes.

A mid-size Step-LLM (8 layers x 2048 by default, random weights in the release's file layout:
``config.json``, bf16 ``model-0000k-of-0000n.safetensors`` shards, the index, a tokenizer) and the
tiny HunyuanCLIP are written once; then, for each variant, a fresh interpreter runs what a
workflow runs and prints its resident memory (RSS) at each stage:

1. before load (the process with torch and the pack imported);
2. after load (StepVideo Text Encoder Loader);
3. after encode (StepVideo Text Encode of a prompt and StepVideo Negative Text Encode);
4. after release: ``release`` drops the weights as StepVideo Text Encoder Memory with
   ``keep_in_ram`` off does after each encode; ``keep`` keeps them (no node);
5. during a DiT-sized allocation, standing in for sampling: ``--dit-ratio`` times the text
   encoder's weights (default 58.7 / 39.2, the release's DiT / Step-LLM in bf16), every page touched;

and the peak (VmHWM) of the whole run. The ``release`` variant then encodes the same prompt
again (the cache answers; RSS must not grow) and a new one (the weights are read again: its
time and RSS). ``--comfyui DIR`` runs inside ComfyUI's model management (in-process, ``--cpu``
unless CUDA is present): the encoder is then a ComfyUI ``ModelPatcher`` and the release goes
through ComfyUI's unload.

    python bench/bench_text_release.py [--layers 8] [--width 2048] [--dtype bf16|fp32]
                                       [--dit-ratio 1.5] [--comfyui ../ComfyUI]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30

CHILD = r"""
import gc, json, sys, time
sys.path.insert(0, {root!r})
comfyui = {comfyui!r}
if comfyui:
    sys.path.append(comfyui)
    import torch
    from comfy.cli_args import args
    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.model_management  # noqa: F401  (the bridge finds it: ComfyUI-managed path)
import importlib.util
import torch

def import_pack(name="stepvideo_pack_bench"):  # the repository as ComfyUI imports a pack
    spec = importlib.util.spec_from_file_location(name, {root!r} + "/__init__.py",
                                                  submodule_search_locations=[{root!r}])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

def rss(field="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

pack = import_pack()
text = sys.modules[pack.__name__ + ".nodes.text"]
bridge = sys.modules[pack.__name__ + ".nodes.comfy_bridge"]
out = dict(variant={variant!r}, managed=bridge.in_comfyui())
out["before_load"] = rss()
handle = text.StepVideoTextEncoderLoader().load("mid", "mid", {dtype!r}, True, "auto")["result"][0]
out["weights"] = handle.encoder.weight_bytes()
out["after_load"] = rss()
pos = text.StepVideoTextEncode().encode(handle, "A panda eats bamboo in a quiet forest.", True)["result"][0]
neg = text.StepVideoNegativeTextEncode().encode(handle, text.NEGATIVE_PROMPT)["result"][0]
out["after_encode"] = rss()
if {variant!r} == "release":
    text.release_text_encoder(handle)  # what keep_in_ram off does after each encode
gc.collect()
out["after_release"] = rss()
dit = torch.empty(int(out["weights"] * {dit_ratio}) // 4, dtype=torch.float32).fill_(1.0)  # pages touched
out["during_dit"] = rss()
del dit
out["peak"] = rss("VmHWM:")
if {variant!r} == "release":
    memory = text.StepVideoTextEncoderMemory().apply(handle, False)["result"][0]
    start = time.perf_counter()
    again = text.StepVideoTextEncode().encode(memory, "A panda eats bamboo in a quiet forest.", True)
    out["cached_seconds"] = time.perf_counter() - start
    out["cached_from_cache"] = "from cache" in again["ui"]["text"][0]
    out["after_cached_encode"] = rss()
    start = time.perf_counter()
    fresh = text.StepVideoTextEncode().encode(memory, "A red kite over the sea.", True)
    out["new_prompt_seconds"] = time.perf_counter() - start
    out["new_prompt_read_again"] = "read again" in fresh["ui"]["text"][0]
    out["after_new_prompt"] = rss()
    out["peak_with_new_prompt"] = rss("VmHWM:")
print(json.dumps(out))
"""


def write_release(folder: Path, layers: int, width: int) -> Path:
    """The mid-size text encoders under ``folder/text_encoders/mid`` (written once per size)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from stepvideo_core.tiny import write_tiny_hunyuan_clip, write_tiny_step_llm

    root = folder / "text_encoders" / "mid"
    if not (root / "step_llm" / "config.json").is_file():
        config = dict(hidden_size=width, num_layers=layers, num_attention_heads=width // 128,
                      num_attention_groups=max(1, width // 512), ffn_hidden_size=width * 11 // 4,
                      padded_vocab_size=65536)
        write_tiny_step_llm(root / "step_llm", config=config, dtype=torch.bfloat16, shards=2)
        write_tiny_hunyuan_clip(root / "hunyuan_clip")
    return folder


def measure(models: Path, variant: str, dtype: str, dit_ratio: float, comfyui: str) -> dict:
    """Run one variant in a fresh interpreter with ``models`` as STEPVIDEO_MODELS_DIR; returns its report."""
    code = CHILD.format(root=str(ROOT), variant=variant, dtype=dtype, dit_ratio=dit_ratio, comfyui=comfyui)
    env = dict(__import__("os").environ, STEPVIDEO_MODELS_DIR=str(models))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT))
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--dtype", default="default", choices=["default", "fp32"],
                        help="Step-LLM weight dtype as the loader's widget (default = bf16)")
    parser.add_argument("--dit-ratio", type=float, default=58.7 / 39.2,
                        help="size of the sampling stand-in allocation, in text encoder weights")
    parser.add_argument("--comfyui", default="", help="a ComfyUI tree: run through its model management")
    parser.add_argument("--models", default="", help="where to write the models (default: a temporary folder)")
    args = parser.parse_args()

    base = Path(args.models) if args.models else Path(tempfile.gettempdir()) / "stepvideo-bench-text-release"
    models = write_release(base / f"{args.layers}x{args.width}", args.layers, args.width)
    comfyui = str(Path(args.comfyui).resolve()) if args.comfyui else ""
    rows = {v: measure(models, v, args.dtype, args.dit_ratio, comfyui) for v in ("keep", "release")}

    first = rows["keep"]
    print(f"Step-LLM {args.layers} x {args.width} + tiny HunyuanCLIP, {args.dtype}: "
          f"{gib(first['weights'])} GiB of weights; sampling stand-in {args.dit_ratio:.2f} x that; "
          f"{'ComfyUI-managed' if first['managed'] else 'outside ComfyUI'}")
    stages = ("before_load", "after_load", "after_encode", "after_release", "during_dit", "peak")
    print(f"{'RSS GiB':<10}" + "".join(f"{s.replace('_', ' '):>15}" for s in stages))
    for variant, r in rows.items():
        print(f"{variant:<10}" + "".join(f"{gib(r[s]):>15}" for s in stages))
    keep, rel = rows["keep"], rows["release"]
    saved = keep["peak"] - rel["peak"]
    print(f"peak RSS difference keep - release: {gib(saved)} GiB ({saved / keep['weights']:.0%} of the weights); "
          f"released: {gib(rel['after_encode'] - rel['after_release'])} GiB")
    print(f"release, same prompt again: {rel['cached_seconds']:.3f} s, from cache: {rel['cached_from_cache']}, "
          f"RSS {gib(rel['after_cached_encode'])} GiB; new prompt: {rel['new_prompt_seconds']:.2f} s "
          f"(weights read again: {rel['new_prompt_read_again']}), RSS after {gib(rel['after_new_prompt'])} GiB")


if __name__ == "__main__":
    main()
