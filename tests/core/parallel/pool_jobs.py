"""Jobs for the WorkerPool tests that need no model (importable by the spawned workers; no tests here)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch

from stepvideo_core.offload import SamplingInterrupted
from stepvideo_core.parallel import ParallelLayout


@dataclasses.dataclass
class Beats:
    """``beats`` rounds of one agreed stop poll each, ``pause`` seconds apart; returns [rank, beats done].

    Failure plants: rank ``fail`` raises at round ``at``; rank ``stall`` sleeps for an hour there; rank
    ``die`` kills itself there (SIGKILL).
    """

    beats: int = 5
    pause: float = 0.02
    fail: int = -1
    stall: int = -1
    die: int = -1
    at: int = 1

    def layout(self, world: int, model) -> ParallelLayout:
        return ParallelLayout(world=world, sp=world, cfg=1)

    def run(self, rank) -> torch.Tensor:
        ctx = rank.context(self.layout(rank.world, rank.model))
        for i in range(self.beats):
            if i == self.at and rank.rank == self.fail:
                raise RuntimeError(f"planted failure on rank {rank.rank}")
            if i == self.at and rank.rank == self.stall:
                time.sleep(3600)
            if i == self.at and rank.rank == self.die:
                os.kill(os.getpid(), signal.SIGKILL)
            if ctx.agree_to_stop(bool(rank.should_stop is not None and rank.should_stop())):
                raise SamplingInterrupted(f"stopped at beat {i}")
            if rank.on_step is not None:
                rank.on_step(i + 1, self.beats, None)
            time.sleep(self.pause)
        return torch.tensor([float(rank.rank), float(self.beats)])
