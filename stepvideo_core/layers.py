"""Small weight-light layers shared by several models (norms stay in the compute dtype)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm over the last axis as StepFun computes it: statistics in fp32, the
    normalised value cast back to the input dtype, then multiplied by ``weight``
    in that dtype (the order matters for bf16 bit-parity)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`RMSNorm`'s arithmetic with an explicit ``weight`` (a layer that fetches its weight
    from elsewhere first, e.g. ComfyUI's partial loading, computes exactly the same values)."""
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # in place when x.float() made a copy (same values, one fp32 buffer fewer); never on x itself
    normed = xf.mul_(scale) if xf is not x else xf * scale
    out = normed.type_as(x)
    return out.mul_(weight) if out is not x else out * weight
