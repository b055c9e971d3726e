"""The VAE decode split across ranks: each decodes a consecutive run of 3-latent chunks, all gather.

Chunks are independent (no state crosses them) and each seam blend touches only the two frames
meeting there, so decoding runs of chunks apart, then blending the seams between runs, gives the
single-process decode bit for bit (tested in fp32).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..vae.config import FRAME_CHUNK, LATENTS_PER_CHUNK
from ..vae.model import blend_seam
from .layout import token_offsets, token_split


def chunk_runs(chunks: int, ranks: int) -> list[tuple[int, int]]:
    """(first chunk, number of chunks) of each rank; ranks beyond the chunk count get none."""
    used = min(chunks, ranks)
    sizes = token_split(chunks, used) + [0] * (ranks - used)
    return list(zip(token_offsets(sizes), sizes))


def decode_split(vae, latents: torch.Tensor, group=None, on_chunk=None, should_stop=None, clamp: bool = True,
                 tile=None, overlap: int = 8) -> torch.Tensor:
    """``vae.decode(latents)`` with the chunks shared among the ranks of ``group`` (all ranks get the video).

    Same arguments as :meth:`~stepvideo_core.vae.StepVideoVAE.decode`; ``on_chunk`` counts this rank's
    chunks.  Every rank must call it with the same latents.
    """
    ranks = dist.get_world_size(group)
    rank = dist.get_rank(group)
    chunks = latents.shape[1] // LATENTS_PER_CHUNK
    runs = chunk_runs(chunks, ranks)
    first, count = runs[rank]
    longest = max(n for _, n in runs) * FRAME_CHUNK
    batch, _, _, h, w = latents.shape
    shape = (batch, longest, vae.config.out_channels, h * 16, w * 16)
    mine = torch.zeros(shape, dtype=vae.compute_dtype, device=vae.device)
    if count:
        part = vae.decode(latents[:, first * LATENTS_PER_CHUNK:(first + count) * LATENTS_PER_CHUNK],
                          on_chunk=on_chunk, should_stop=should_stop, clamp=False, tile=tile, overlap=overlap)
        mine[:, :part.shape[1]] = part.to(mine.device)
        del part
    gathered = [torch.empty_like(mine) for _ in range(ranks)]
    dist.all_gather(gathered, mine, group=group)
    del mine
    video = torch.cat([g[:, :n * FRAME_CHUNK] for g, (_, n) in zip(gathered, runs) if n], dim=1)
    del gathered
    for start, n in runs[1:]:
        if n and start:
            blend_seam(video, start * FRAME_CHUNK)
    return video.clamp_(-1.0, 1.0) if clamp else video
