"""Peak bytes of tensors produced while some code runs, measured on any device (CPU included).

A ``TorchDispatchMode`` sees every aten op's outputs; each output storage is counted
from its creation until the last tensor using it is garbage collected.  Kernel-internal
workspaces are not seen (small for the kernels the DiT uses).  Used to check the
planner's activation model against what the real block code allocates.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` then ``m.peak``: the most bytes alive at once (new storages only)."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0
        self._known = set()

    def ignore(self, *tensors):
        """Storages that already existed (inputs, weights) never count."""
        for t in tensors:
            self._known.add(t.untyped_storage().data_ptr())

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def _track(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._known or storage.nbytes() == 0:
            return
        if key in self.live:
            self.live[key][0] += 1
        else:
            self.live[key] = [1, storage.nbytes()]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def forward_peak(model, dtype, frames=3, height=16, width=32, around=None) -> int:
    """Peak bytes one batched-CFG forward of the tiny-shaped ``model`` allocates (weights and inputs excluded).

    Random latents [2, frames, 64, height, width] and text inputs of the tiny DiT's widths (320 Step-LLM
    tokens of 96, 77 CLIP tokens of 48).  ``around``: a context manager entered around the forward
    (e.g. :func:`stepvideo_core.parallel.attach` on a rank).
    """
    from contextlib import nullcontext

    gen = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, frames, 64, height, width, generator=gen).to(dtype),
              timestep=torch.tensor([0.5, 0.5], dtype=dtype),
              encoder_hidden_states=torch.randn(2, 320, 96, generator=gen).to(dtype),
              encoder_hidden_states_2=torch.randn(2, 77, 48, generator=gen).to(dtype),
              encoder_attention_mask=torch.ones(2, 397, dtype=dtype))
    counter = LiveBytes()
    counter.ignore(*model.parameters(), *model.buffers(), *kw.values())
    with torch.no_grad(), (around if around is not None else nullcontext()), counter:
        model(**kw)
    return counter.peak
