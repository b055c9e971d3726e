"""How a run splits over several processes: sequence parallel (Ulysses) x CFG parallel.

Pure arithmetic, no communication: which rank holds which tokens, which heads, which guidance
branch.  Ranks are numbered ``rank = cfg_rank * sp + sp_rank``: the ranks of one sequence-parallel
group are consecutive (on one machine, neighbouring GPUs), and each CFG group pairs the ranks that
hold the same tokens of the two guidance branches.
"""

from __future__ import annotations

import dataclasses

MODES = ("auto", "ulysses", "cfg")


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run (the message says what would)."""


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """``world`` processes = ``cfg`` guidance groups x ``sp`` sequence-parallel ranks each."""

    world: int
    sp: int
    cfg: int

    @classmethod
    def choose(cls, mode: str, world: int, heads: int, guided: bool) -> "ParallelLayout":
        """The layout for ``mode`` ("auto", "ulysses" or "cfg") on ``world`` processes.

        * ulysses: every rank in one sequence-parallel group (``heads`` must be divisible by ``world``);
        * cfg: the two guidance branches on two ranks (``world`` 2), or on two groups of ``world/2``
          sequence-parallel ranks;
        * auto: CFG parallel when the run is guided and ``world`` is even, the rest sequence parallel.

        Raises :class:`ParallelConfigError` naming the choices that would work.
        """
        if mode not in MODES:
            raise ParallelConfigError(f"parallel mode must be one of {list(MODES)}, got {mode!r}")
        if not isinstance(world, int) or world < 1:
            raise ParallelConfigError(f"the number of processes must be a positive integer, got {world!r}")
        if mode == "cfg" or (mode == "auto" and guided and world % 2 == 0):
            if not guided:
                raise ParallelConfigError("CFG parallel needs guidance (cfg > 1): with cfg 1 there is one branch; "
                                          "use --parallel ulysses")
            if world % 2:
                raise ParallelConfigError(f"CFG parallel puts the two guidance branches on two groups of ranks: "
                                          f"it needs an even number of processes, got {world}")
            cfg = 2
        else:
            cfg = 1
        sp = world // cfg
        if heads % sp:
            good = [n * cfg for n in range(1, heads + 1) if heads % n == 0 and n * cfg <= 64]
            raise ParallelConfigError(f"sequence parallel splits the {heads} attention heads over {sp} ranks, which "
                                      f"does not divide them; use a number of processes in {good}")
        return cls(world=world, sp=sp, cfg=cfg)

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp

    def cfg_rank(self, rank: int) -> int:
        return rank // self.sp

    def sp_groups(self) -> list[list[int]]:
        """The ranks of each sequence-parallel group (consecutive ranks)."""
        return [list(range(c * self.sp, (c + 1) * self.sp)) for c in range(self.cfg)]

    def cfg_groups(self) -> list[list[int]]:
        """The ranks of each CFG pair (same tokens, the two branches)."""
        return [[c * self.sp + s for c in range(self.cfg)] for s in range(self.sp)]

    def describe(self) -> str:
        parts = []
        if self.cfg > 1:
            parts.append("CFG parallel (cond | uncond)")
        if self.sp > 1:
            parts.append(f"Ulysses sequence parallel over {self.sp} ranks")
        return f"{self.world} processes: " + (" x ".join(parts) if parts else "one process")


def token_split(tokens: int, ranks: int) -> list[int]:
    """How many of ``tokens`` each of ``ranks`` holds: balanced, the first ``tokens % ranks`` get one more.

    Uneven splits need no padding: the all-to-all exchanges take per-rank sizes (so no padded token
    ever enters an attention as a key, and no mask is needed).
    """
    if ranks < 1 or tokens < ranks:
        raise ParallelConfigError(f"cannot split {tokens} video tokens over {ranks} ranks: use fewer processes "
                                  f"or a larger video")
    base, extra = divmod(tokens, ranks)
    return [base + (1 if r < extra else 0) for r in range(ranks)]


def token_offsets(sizes: list[int]) -> list[int]:
    """Start index of each rank's tokens for the sizes of :func:`token_split`."""
    out, start = [], 0
    for size in sizes:
        out.append(start)
        start += size
    return out
