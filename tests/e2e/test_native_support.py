"""Helpers of the native-family tests (``test_native_*.py``): the real ComfyUI modules in-process, the
pack's native modules, and tiny Step-Video DiTs built twice from the same weights (the native
diffusion model and the pack's plain core model).  No tests here.

ComfyUI runs with ``args.cpu = True`` when there is no GPU, as ``main.py --cpu`` would.  ComfyUI's
own top-level ``nodes`` module is imported with the ComfyUI tree first on ``sys.path`` for that one
import only: the checkout's ``nodes/`` package (the pack's nodes, imported by the tests under the
pack's module name) would otherwise shadow it.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.core.sampling.conftest import conditioning

SIZE = dict(width=32, height=48, frames=17)        # latent [1, 64, 3, 3, 2]


def setup_comfy(tree: Path) -> types.SimpleNamespace:
    """ComfyUI's modules the native tests use, imported from ``tree`` (CPU when there is no GPU)."""
    tree = str(tree)
    if tree not in sys.path:
        sys.path.append(tree)  # last, so ComfyUI's own `tests`/`nodes` shadow nothing of ours
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers

    return types.SimpleNamespace(mm=comfy.model_management, samplers=comfy.samplers, sample=comfy.sample,
                                 ops=comfy.ops, patcher=comfy.model_patcher, ext=comfy.patcher_extension)


def comfy_nodes(tree: Path):
    """ComfyUI's ``nodes`` module (KSampler, SetLatentNoiseMask, ...) and its ``comfy_extras``."""
    current = sys.modules.get("nodes")
    if current is not None:
        assert str(Path(current.__file__).resolve()).startswith(str(Path(tree).resolve())), current
        return current
    sys.path.insert(0, str(tree))
    try:
        return importlib.import_module("nodes")
    finally:
        sys.path.remove(str(tree))


def extras(tree: Path, name: str):
    """``comfy_extras.<name>`` (after :func:`comfy_nodes`, which several of them import)."""
    comfy_nodes(tree)
    return importlib.import_module(f"comfy_extras.{name}")


def native(pack) -> types.SimpleNamespace:
    """The pack's native modules and its copy of the core (one class identity for isinstance checks)."""
    name = pack.__name__
    return types.SimpleNamespace(model=importlib.import_module(f"{name}.nodes.native_model"),
                                 nodes=importlib.import_module(f"{name}.nodes.native"),
                                 core=importlib.import_module(f"{name}.stepvideo_core"),
                                 tiny=importlib.import_module(f"{name}.stepvideo_core.tiny"),
                                 sampler=importlib.import_module(f"{name}.nodes.sampler"),
                                 types=importlib.import_module(f"{name}.nodes.types"),
                                 vae=importlib.import_module(f"{name}.nodes.vae"))


def tiny_weights(nat, seed: int = 0, config=None) -> tuple[dict, dict]:
    config = dict(config or nat.tiny.TINY_DIT_CONFIG)
    return config, nat.tiny.tiny_dit_state_dict(config, seed)


def native_dit(nat, dtype=torch.float32, seed: int = 0, config=None, ops=None):
    """The tiny DiT as the native diffusion model (ComfyUI-castable layers), weights on the CPU."""
    config, sd = tiny_weights(nat, seed, config)
    dit = nat.core.build_transformer(config, device="meta", dtype=dtype, operations=ops or nat.model.native_ops,
                                     model_class=nat.model.StepVideoDiffusionModel)
    dit.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return dit


def core_dit(nat, dtype=torch.float32, seed: int = 0, config=None):
    """The same tiny DiT as the pack's plain core model (what StepVideoSampler runs)."""
    config, sd = tiny_weights(nat, seed, config)
    dit = nat.core.build_transformer(config, device="meta", dtype=dtype)
    dit.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return dit


def prompts():
    """(positive, negative) STEPVIDEO_CONDITIONING-like dicts for the tiny DiT (different valid lengths)."""
    return conditioning(1, valid=5), conditioning(2, valid=2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


class CallCounter:
    """Counts the DiT's real computations (a forward pre-hook on its first transformer block) and
    records the latent shape ComfyUI hands the diffusion model."""

    def __init__(self, dit):
        self.calls = 0
        self.shapes = []
        self._handles = [dit.transformer_blocks[0].register_forward_pre_hook(self._block),
                         dit.register_forward_pre_hook(self._model)]

    def _block(self, module, args):
        self.calls += 1

    def _model(self, module, args):
        if args:
            self.shapes.append(tuple(args[0].shape))

    def remove(self):
        for handle in self._handles:
            handle.remove()


# --------------------------------------------------------------------------- fixtures the native test modules import


@pytest.fixture(scope="module")
def comfy(comfyui_importable):
    """ComfyUI's modules in this process (:func:`setup_comfy`)."""
    return setup_comfy(comfyui_importable)


@pytest.fixture(scope="module")
def nat(pack, comfy):
    """The pack's native modules (:func:`native`)."""
    return native(pack)


@pytest.fixture(scope="module")
def custom(comfyui_importable, comfy):
    """``comfy_extras.nodes_custom_sampler`` (SamplerCustomAdvanced, CFGGuider, KSamplerSelect)."""
    return extras(comfyui_importable, "nodes_custom_sampler")


@pytest.fixture(scope="module")
def cnodes(comfyui_importable, comfy):
    """ComfyUI's own ``nodes`` module (:func:`comfy_nodes`)."""
    return comfy_nodes(comfyui_importable)
