"""Several processes for one video: Ulysses sequence parallel and CFG parallel on torch.distributed.

:class:`ParallelLayout` says how ``world`` processes split the work (pure arithmetic);
:class:`ParallelContext` holds this rank's process groups and the collectives (the Ulysses
all-to-all exchange, token and branch gathers, agreement to stop).
"""

from .context import ParallelContext, heads_to_sequence, sequence_to_heads
from .dit import attach
from .layout import MODES, ParallelConfigError, ParallelLayout, token_offsets, token_split

__all__ = ["MODES", "attach", "ParallelConfigError", "ParallelContext", "ParallelLayout", "heads_to_sequence",
           "sequence_to_heads", "token_offsets", "token_split"]
