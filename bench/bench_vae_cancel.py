"""How soon a cancel lands during VAE decode: inside a chunk versus at the next chunk boundary.

Builds the **released** VAE v2 architecture (z 64, decoder ch 128, 499 M weights) with random
weights in fp32 on the CPU, decodes one 3-latent chunk (17 frames) at ``--size`` pixels and
measures, in the same run:

* the time of one whole chunk (what a cancel waited for when the decoder was polled only
  between chunks);
* the gaps between successive ``should_stop`` polls during one chunk: the longest gap bounds
  how long a cancel can wait (one convolution or the mid attention at that size);
* for several request times spread over the chunk, the delay from the request (a timer
  thread sets the flag ``should_stop`` reads) to the :class:`VAEInterrupted` exception.

Printed: the chunk time, the polls and the longest gap, each request's delay, and chunk time /
longest gap (how much sooner a cancel lands than when polling only between chunks).

    python bench/bench_vae_cancel.py [--size 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core import build_vae  # noqa: E402
from stepvideo_core.vae import VAEInterrupted  # noqa: E402


def random_released_vae() -> torch.nn.Module:
    """The released architecture on the CPU with small random weights (uninitialised memory could be NaN)."""
    vae = build_vae(None, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else torch.zeros_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    return vae


def cancel_delay(vae, latents, after: float) -> tuple[float, str]:
    """Seconds from a stop request ``after`` seconds into the decode to the exception, and its message."""
    flag = threading.Event()
    timer = threading.Timer(after, flag.set)
    requested = []
    timer.start()
    start = time.perf_counter()
    try:
        vae.decode(latents, should_stop=flag.is_set)
    except VAEInterrupted as exc:
        stopped = time.perf_counter()
        requested.append(start + after)
        return stopped - requested[0], str(exc)
    finally:
        timer.cancel()
    return float("nan"), "finished before the request"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="frame height = width in pixels (multiple of 16)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae = random_released_vae()
    latents = torch.randn(1, 3, 64, args.size // 16, args.size // 16, generator=torch.Generator().manual_seed(1))
    vae.decode(latents)  # warm-up
    start = time.perf_counter()
    vae.decode(latents)
    chunk = time.perf_counter() - start
    print(f"released VAE v2 (random weights), fp32 on CPU, {args.threads} threads, one chunk "
          f"{args.size}x{args.size}x17: {chunk:.2f} s")
    polls = []
    vae.decode(latents, should_stop=lambda: polls.append(time.perf_counter()) and False)
    gaps = [b - a for a, b in zip(polls, polls[1:])]
    print(f"  {len(polls)} polls per chunk; longest gap between two polls {max(gaps):.2f} s, median "
          f"{sorted(gaps)[len(gaps) // 2]:.3f} s")
    for fraction in (0.2, 0.5, 0.8):
        delay, message = cancel_delay(vae, latents, fraction * chunk)
        print(f"  stop requested at {fraction:.0%} of the chunk: stopped {delay:.2f} s later ({message})")
    print(f"a cancel waits at most {max(gaps):.2f} s; polled between chunks only, it waited up to {chunk:.2f} s "
          f"(chunk / longest gap = {chunk / max(gaps):.1f}x)")


if __name__ == "__main__":
    main()
