"""Counting the aten operations a piece of code runs: on a GPU each one is a kernel launch.

Shared by the benches and the tests that hold a code path to its kernel count (fp8 matmuls, LoRA on the
fly); a ``TorchDispatchMode`` sees every operation, and views, reshapes and allocations, which launch
nothing, are left out.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# operations that only make a view or an allocation (no kernel runs)
NOT_KERNELS = frozenset({"view", "_unsafe_view", "reshape", "t", "transpose", "slice", "expand", "detach", "alias",
                         "as_strided", "unsqueeze", "squeeze", "permute", "select", "unflatten", "split",
                         "split_with_sizes", "chunk", "empty", "empty_like", "empty_strided"})


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as count: ...`` then ``count.ops`` (a Counter by aten name) and ``count.total``."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    @property
    def total(self) -> int:
        """How many operations ran (kernel launches on a GPU)."""
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOT_KERNELS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))
