"""VAE-family nodes: load the Step-Video VAE v2, decode LATENT -> IMAGE, encode IMAGE -> LATENT.

Layouts at the sockets are ComfyUI's: LATENT ``{"samples": [B, C, F, h, w]}`` and IMAGE
``[frames, H, W, 3]`` float in [0, 1]; the core's [B, F, C, h, w] / [B, T, 3, H, W] in
[-1, 1] appear only inside this module.  Progress and interrupts go through the bridge,
one step per 17-frame chunk.

Inside ComfyUI the VAE is a ComfyUI-managed model (a ``ModelPatcher`` on the handle, as
``comfy.sd.VAE`` has): each decode/encode loads it with ``load_models_gpu`` and it stays
loaded until ComfyUI needs the memory.  Outside ComfyUI it moves to the compute device
for the call and back to rest afterwards.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from ..stepvideo_core import load_vae
from ..stepvideo_core.dtypes import DEFAULT, parse_dtype
from ..stepvideo_core.vae import StepVideoVAE, VAEInterrupted, from_comfy_latent, to_comfy_latent
from . import comfy_bridge as bridge
from .types import STEPVIDEO_VAE, StepVideoVAEHandle

log = logging.getLogger("StepVideo")

VAE_FOLDER = "vae"
VAE_DTYPES = (DEFAULT, "bf16", "fp32")  # weight_dtype combo; "default" = stepvideo_core.dtypes.default_dtype
MAX_TILE = 1024


# Working memory of a decode/encode beyond the weights, in multiples of the weights (what the
# node freed before it was ComfyUI-managed: four times the weights, weights included).
WORK_FACTOR = 3


class VAEModules(torch.nn.Module):
    """The VAE as the module ComfyUI manages (a container: ComfyUI sets ``device`` on the module it
    manages, which :class:`StepVideoVAE` derives from its weights)."""

    def __init__(self, vae: StepVideoVAE):
        super().__init__()
        self.vae = vae


def resolve_vae_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype for a ``weight_dtype`` combo value: "default" = the core's default_dtype (bf16 on CUDA,
    fp32 elsewhere).  Raises ValueError naming the allowed values for any other choice."""
    try:
        return parse_dtype(choice, device, choices=VAE_DTYPES, what="VAE weight_dtype")
    except ValueError as exc:
        raise ValueError(f"StepVideo: {exc}") from None


def run_on_device(handle: StepVideoVAEHandle, work):
    """Run ``work(vae)`` with the VAE on its compute device.

    Inside ComfyUI, ComfyUI loads it (``load_models_gpu``, freeing VRAM for it and its working
    memory) and keeps it loaded until it needs the memory.  Elsewhere the VAE moves to the
    device for the call and back to rest afterwards, so 1 GB does not sit in VRAM between runs;
    on the CPU both devices are the same and nothing moves.  A stop request surfaces as
    ComfyUI's own interrupt.
    """
    vae = handle.vae
    if handle.patcher is not None:
        weights = bridge.module_bytes(handle.patcher.model)
        bridge.load_models([handle.patcher], memory_required=WORK_FACTOR * weights, full=True)
        try:
            return work(vae)
        except VAEInterrupted:
            bridge.check_interrupt()
            raise
    moved = handle.device != handle.offload_device
    if moved and handle.device.type == "cuda":
        weights = sum(p.numel() * p.element_size() for p in vae.parameters())
        bridge.free_memory(weights * (WORK_FACTOR + 1), handle.device)
    try:
        if moved:
            vae.to(handle.device)
        return work(vae)
    except VAEInterrupted:
        bridge.check_interrupt()  # raises the host's interrupt exception (and clears the flag outside ComfyUI)
        raise
    finally:
        if moved:
            vae.to(handle.offload_device)


def _progress(total: int):
    """An ``on_chunk(done, total)`` callback driving a bridge progress bar of ``total`` steps."""
    bar = bridge.progress_bar(total)
    return lambda done, n: bar.update_absolute(done, n)


class StepVideoVAELoader:
    """Loads ``vae_v2.safetensors`` (the Step-Video Video-VAE v2)."""

    CATEGORY = "StepVideo/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (STEPVIDEO_VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Step-Video VAE v2 with its dtype and devices.",)
    DESCRIPTION = ("Loads the Step-Video-T2V Video-VAE v2 (vae/vae_v2.safetensors of the release) from "
                   "models/vae. The older vae.safetensors (v1) does not fit Step-Video-T2V latents.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (bridge.list_model_entries(VAE_FOLDER), {
                    "tooltip": "vae_v2.safetensors (or a single-file copy of it) under models/vae."}),
                "weight_dtype": (list(VAE_DTYPES), {
                    "default": "default", "tooltip": "default = bf16 on CUDA (as the official pipeline), "
                                                     "fp32 on CPU."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, vae_name, weight_dtype):
        """Fingerprint (size, mtime) of the file, so re-saving it reloads; NaN when missing."""
        try:
            stat = bridge.resolve_model_path(VAE_FOLDER, vae_name).stat()
            return f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return float("nan")

    def load(self, vae_name, weight_dtype):
        """Return the UI summary and a :class:`StepVideoVAEHandle`."""
        path = bridge.resolve_model_path(VAE_FOLDER, vae_name)
        device, offload = bridge.torch_device(), bridge.offload_device()
        dtype = resolve_vae_dtype(weight_dtype, device)
        start = time.perf_counter()
        vae = load_vae(path, dtype=dtype, device=offload)
        seconds = time.perf_counter() - start
        handle = StepVideoVAEHandle(vae=vae, dtype=dtype, device=device, offload_device=offload, source=path,
                                    patcher=bridge.model_patcher(VAEModules(vae), device, offload))
        cfg = vae.config
        summary = "\n".join([
            f"Step-Video VAE v2: {vae_name}",
            f"{cfg.z_channels} latent channels, {vae.num_parameters() / 1e6:.1f}M parameters, "
            f"{str(dtype).replace('torch.', '')}",
            f"weights on {offload}, compute on {device}, loaded in {seconds:.1f} s"
            + (", ComfyUI-managed" if handle.patcher is not None else ""),
        ])
        log.info(summary.replace("\n", "; "))
        return {"ui": {"text": [summary]}, "result": (handle,)}


class StepVideoVAEDecode:
    """LATENT [B, C, F, h, w] -> IMAGE frames, 3 latent frames (17 video frames) at a time."""

    CATEGORY = "StepVideo/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("All frames, [frames, H, W, 3] in [0, 1] (batch items one after another).",)
    DESCRIPTION = ("Decodes Step-Video latents (a multiple of 3 latent frames) to video frames with the "
                   "official chunking and seam blending. Tiling lowers memory for large frames at some "
                   "cost in fidelity.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (STEPVIDEO_VAE,),
                "samples": ("LATENT", {"tooltip": "Step-Video latents {'samples': [B, 64, F, h, w]}."}),
            },
            "optional": {
                "tile_size": ("INT", {
                    "default": 0, "min": 0, "max": MAX_TILE, "step": 1,
                    "tooltip": "Spatial tile size in latent pixels (x16 image pixels); 0 = no tiling "
                               "(the official, exact decode)."}),
                "tile_overlap": ("INT", {
                    "default": 8, "min": 0, "max": MAX_TILE - 1, "step": 1,
                    "tooltip": "Overlap of neighbouring tiles in latent pixels, blended linearly."}),
                "use_gpu_workers": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "When StepVideo Sampler runs with gpus > 1, its GPU workers (already running) "
                               "decode a share of the 17-frame chunks each: the same frames, faster. Off, or "
                               "without workers: this GPU alone. A shared decode cannot be stopped midway."}),
            },
        }

    def decode(self, vae, samples, tile_size=0, tile_overlap=8, use_gpu_workers=True):
        """Return ``(images,)``: float32 [B*T, H, W, 3] in [0, 1] on the CPU."""
        latents = from_comfy_latent(samples["samples"])
        chunks = max(latents.shape[1] // 3, 1)
        tile = int(tile_size) if tile_size else None

        def work(model):
            progress = _progress(chunks)
            if use_gpu_workers:
                from . import multi_gpu

                shared = multi_gpu.decode_on_workers(vae, latents, tile=tile, overlap=int(tile_overlap),
                                                     on_chunk=progress)
                if shared is not None:
                    return shared
            return model.decode(latents, on_chunk=progress, should_stop=bridge.interrupt_requested,
                                tile=tile, overlap=int(tile_overlap), output_device="cpu")

        video = run_on_device(vae, work)  # [B, T, 3, H, W] in [-1, 1]
        images = video.permute(0, 1, 3, 4, 2).flatten(0, 1).float()
        del video
        return (images.add_(1.0).mul_(0.5),)


class StepVideoVAEEncode:
    """IMAGE frames -> LATENT, 17 frames at a time (frame count a multiple of 17, sizes of 16)."""

    CATEGORY = "StepVideo/latent"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Step-Video latents {'samples': [1, 64, frames/17*3, H/16, W/16]}.",)
    DESCRIPTION = ("Encodes video frames (a multiple of 17, height and width multiples of 16) to Step-Video "
                   "latents: the posterior sample (seeded) or its mean.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (STEPVIDEO_VAE,),
                "images": ("IMAGE", {"tooltip": "Frames [T, H, W, 3] in [0, 1], one video."}),
                "mode": (["sample", "mean"], {
                    "default": "sample", "tooltip": "sample = mean + std * noise as the official encode; "
                                                    "mean = deterministic."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the posterior noise (mode 'sample')."}),
            }
        }

    def encode(self, vae, images, mode="sample", seed=0):
        """Return ``({"samples": [1, z, F, h, w]},)`` in float32 on the CPU."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"StepVideo: IMAGE must be [frames, H, W, 3], got {list(images.shape)}")
        video = images.permute(0, 3, 1, 2).unsqueeze(0).mul(2.0).sub_(1.0)  # [1, T, 3, H, W] in [-1, 1]
        chunks = max(video.shape[1] // 17, 1)
        generator: Optional[torch.Generator] = torch.Generator().manual_seed(int(seed)) if mode == "sample" else None

        def work(model):
            return model.encode(video, generator=generator, sample=mode == "sample", on_chunk=_progress(chunks),
                                should_stop=bridge.interrupt_requested, output_device="cpu")

        latents = run_on_device(vae, work)
        return ({"samples": to_comfy_latent(latents.float())},)


NODE_CLASS_MAPPINGS = {
    "StepVideoVAELoader": StepVideoVAELoader,
    "StepVideoVAEDecode": StepVideoVAEDecode,
    "StepVideoVAEEncode": StepVideoVAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StepVideoVAELoader": "StepVideo VAE Loader",
    "StepVideoVAEDecode": "StepVideo VAE Decode",
    "StepVideoVAEEncode": "StepVideo VAE Encode",
}
