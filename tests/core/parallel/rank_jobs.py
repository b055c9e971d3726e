"""What the ranks of the parallel tests run (importable by spawned processes; no tests here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exchange_attention(rank, world, shape, dtype_name, seed):
    """This rank's slice of SDPA through the Ulysses exchange, and the single-process reference."""
    from stepvideo_core.parallel import ParallelContext, ParallelLayout

    dtype = getattr(torch, dtype_name)
    b, heads, tokens, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    layout = ParallelLayout.choose("ulysses", world, heads, guided=False)
    ctx = ParallelContext.create(layout, torch.device("cpu"))
    start, count = ctx.local_tokens(tokens)
    local = [t[:, :, start:start + count] for t in (q, k, v)]
    out = ctx.attention(local, attend=lambda qkv: F.scaled_dot_product_attention(*qkv), tokens=tokens)
    gathered = ctx.gather_tokens(out.transpose(1, 2), tokens).transpose(1, 2)
    reference = F.scaled_dot_product_attention(q, k, v)
    return {"local": out, "reference_slice": reference[:, :, start:start + count], "gathered": gathered,
            "reference": reference, "count": count}


def branches(rank, world):
    from stepvideo_core.parallel import ParallelContext, ParallelLayout

    layout = ParallelLayout.choose("cfg", world, 4, guided=True)
    ctx = ParallelContext.create(layout, torch.device("cpu"))
    local = torch.full((2, 3), float(ctx.cfg_rank + 1))
    cond, uncond = ctx.gather_branches(local)
    stop = ctx.agree_to_stop(rank == world - 1)
    shared = ctx.broadcast_tensors({"x": torch.arange(3)} if rank == 0 else None)
    return {"cond": cond, "uncond": uncond, "stop": stop, "shared": shared["x"], "sp_rank": ctx.sp_rank,
            "cfg_rank": ctx.cfg_rank}


def vae_decode(rank, world, vae_dir, frames):
    """The split decode and this rank's single-process decode of the same latents (fp32)."""
    import torch.distributed as dist

    from stepvideo_core import load_vae
    from stepvideo_core.parallel.vae import decode_split

    vae = load_vae(vae_dir, dtype=torch.float32)
    z = vae.config.z_channels
    latents = torch.randn((1, frames, z, 2, 3), generator=torch.Generator().manual_seed(5))
    chunks = []
    video = decode_split(vae, latents, group=dist.group.WORLD, on_chunk=lambda done, total: chunks.append(total))
    return {"split": video, "single": vae.decode(latents), "chunks": chunks}


SIZE_ODD = dict(width=48, height=16, frames=17)   # 3 latent frames x 1 x 3 = 9 tokens: 5 + 4 on 2 ranks


def dit_parallel(rank, world, mode, steps, lora_path, blocks_on_device, dtype_name="float32"):
    """2-step sampling of the tiny DiT on this rank's share of ``mode`` and in one process; the forward too."""
    from contextlib import nullcontext

    from stepvideo_core.lora import LoraEntry, attached, load_lora
    from stepvideo_core.parallel import ParallelContext, ParallelLayout, attach
    from stepvideo_core.sampling import Placement, SamplingSettings, sample
    from tests.core.sampling.conftest import conditioning, tiny_model

    dtype = getattr(torch, dtype_name)
    model = tiny_model(dtype)
    layout = ParallelLayout.choose(mode, world, model.config.num_attention_heads, guided=True)
    ctx = ParallelContext.create(layout, torch.device("cpu"))
    pos, neg = conditioning(1, valid=5), conditioning(2, valid=3)
    settings = dict(**SIZE_ODD, steps=steps, cfg=9.0, shift=13.0, seed=3)
    streaming = dict(blocks_on_device=blocks_on_device, streamer_mode="copy") if blocks_on_device is not None else {}
    adapters = nullcontext()
    if lora_path:
        adapters = attached(model, [LoraEntry(load_lora(lora_path, model), 0.8, "on_the_fly")])
    with adapters:
        single = sample(model, pos, neg, settings=SamplingSettings(**settings), placement=Placement(**streaming))
        with attach(model, ctx):
            parallel = sample(model, pos, neg, settings=SamplingSettings(**settings), placement=Placement(**streaming))
    hooks = sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.transformer_blocks)
    return {"single": single, "parallel": parallel, "layout": (layout.sp, layout.cfg),
            "hooks_left": hooks + len(model._forward_pre_hooks) + len(model._forward_hooks),
            "seams_left": sum("attend" in vars(b.attn1) for b in model.transformer_blocks)
                          + ("run_blocks" in vars(model))}


def sample_with_parallel(rank, world, mode, stop_rank, stop_step, blocks_on_device):
    """``sample(parallel=ctx)`` on every rank; ``stop_rank`` asks to stop before step ``stop_step`` (1-based)."""
    from stepvideo_core.offload import SamplingInterrupted
    from stepvideo_core.parallel import ParallelContext, ParallelLayout
    from stepvideo_core.sampling import Placement, SamplingSettings, sample
    from tests.core.sampling.conftest import conditioning, tiny_model

    model = tiny_model(torch.float32)
    ctx = ParallelContext.create(ParallelLayout.choose(mode, world, 2, guided=True), torch.device("cpu"))
    home = {k: v.clone() for k, v in model.state_dict().items()}
    steps_seen = []
    asked = {"n": 0}

    def should_stop():
        asked["n"] += 1
        return rank == stop_rank and len(steps_seen) + 1 >= stop_step

    settings = dict(**SIZE_ODD, steps=4, cfg=9.0, shift=13.0, seed=3)
    streaming = dict(blocks_on_device=blocks_on_device, streamer_mode="copy") if blocks_on_device is not None else {}
    outcome = "done"
    try:
        latents = sample(model, conditioning(1, valid=5), conditioning(2, valid=3),
                         settings=SamplingSettings(**settings), placement=Placement(**streaming, parallel=ctx),
                         on_step=lambda i, n, x: steps_seen.append(i), should_stop=should_stop)
    except SamplingInterrupted:
        outcome, latents = "stopped", None
    single = sample(model, conditioning(1, valid=5), conditioning(2, valid=3), settings=SamplingSettings(**settings))
    weights_home = all(torch.equal(v, home[k]) and v.device.type == "cpu" for k, v in model.state_dict().items())
    return {"outcome": outcome, "steps": steps_seen, "latents": latents, "single": single, "asked": asked["n"],
            "weights_home": weights_home}


def forward_live_bytes(rank, world, mode, heads, dtype_name, frames, height, width):
    """Peak bytes this rank's share of one batched-CFG forward allocates (weights, inputs excluded).

    The tiny DiT with ``heads`` heads of 128 under ``mode`` ("ulysses" or "cfg") on ``world`` ranks, counted
    by :class:`tests.core.offload.livebytes.LiveBytes` (``world`` 1: the one-process forward).
    """
    from stepvideo_core.parallel import ParallelContext, ParallelLayout, attach
    from stepvideo_core.tiny import TINY_DIT_CONFIG
    from tests.core.offload.livebytes import forward_peak
    from tests.core.sampling.conftest import tiny_model

    dtype = getattr(torch, dtype_name)
    model = tiny_model(dtype, config=dict(TINY_DIT_CONFIG, num_attention_heads=heads))
    ctx = ParallelContext.create(ParallelLayout.choose(mode, world, heads, guided=True), torch.device("cpu"))
    return {"peak": forward_peak(model, dtype, frames, height, width, around=attach(model, ctx))}
