"""Building blocks of the Step-Video Video-VAE v2 (names follow the checkpoint keys).

Activations are ``[B, C, T, H, W]`` throughout.  Facts every block relies on:

* 3D convolutions are causal in time: ``k_t - 1`` zero frames in front (the official
  formula adds ``max(1 - stride_t, 0)``, which is 0 for every stride used), nothing
  behind, and symmetric ``k // 2`` zero padding in space.  Where a norm and
  activation precede the conv, the zero frames are added *after* the activation.
* Every GroupNorm (32 groups, eps 1e-5) normalises each frame on its own (v2).
* The space-to-channel ("patchify") layers regroup 2x2x2 neighbourhoods into
  channels, index ``c * 8 + dt * 4 + dy * 2 + dx``, after prepending one zero frame;
  their inverse drops the first output frame instead.

Memory layout (bit parity).  CPU (oneDNN) and GPU convolutions and GroupNorm choose
their kernel, and with it the rounding of bf16 (and of large fp32) results, by the
memory layout of their input.  Every layer here hands each conv and norm the layout
the official code hands it, which makes bf16 results bit-identical to the official
code on the same machine (tests/core/vae/test_official_bitexact.py):

* the convs of the res-blocks, of the upsampling res-block, the attention's
  ``proj_out`` and both ``conv_out`` run on channels-last (NDHWC) tensors
  (``channels_last=True``); the 2D re-samplers on channels-last (NHWC) frames;
* ``conv_in``, the (un)patchify convs and the attention's q/k/v take their input in
  the layout it arrives in, ``Downsample3D`` too (its padding keeps the layout);
* every GroupNorm runs on contiguous [B*T, C, H, W] frames.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import GROUPS, NORM_EPS

IntOrTriple = Union[int, Sequence[int]]


def _triple(value: IntOrTriple) -> tuple:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def frame_group_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``norm`` (a GroupNorm) applied to every frame of ``x`` [B, C, T, H, W] separately.

    Exists because the v2 VAE takes statistics per frame (over a channel group x H x W),
    not over the whole clip as a 3D GroupNorm would.  The frames are handed to the norm
    as one contiguous [B*T, C, H, W] tensor whatever the layout of ``x`` (a
    channels-last input is copied), because that is what the official code normalises
    and GroupNorm rounds differently on channels-last memory.  Returns [B, C, T, H, W]
    (a transposed view of a [B, T, C, H, W] tensor).
    """
    b, c, t, h, w = x.shape
    y = norm(x.transpose(1, 2).reshape(b * t, c, h, w).contiguous())
    return y.reshape(b, t, c, h, w).transpose(1, 2)


def norm_silu(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """SiLU(per-frame GroupNorm(x)); the pre-activation of every res-block conv."""
    return F.silu(frame_group_norm(x, norm), inplace=True)


def _channels_last_strides(shape: Sequence[int]) -> tuple:
    """The strides PyTorch gives a fresh channels-last-3d tensor of ``shape`` [B, C, T, H, W]."""
    _, c, t, h, w = shape
    sw = c
    sh = sw * max(w, 1)
    st = sh * max(h, 1)
    return (st * max(t, 1), 1, st, sh, sw)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, C, T, H, W] in channels-last (NDHWC) memory; ``x`` itself when it already is.

    Checks the exact strides, not ``is_contiguous(memory_format=...)``: that ignores the
    strides of size-1 dims (e.g. B = 1), which the kernels' own layout test does not.
    """
    if x.stride() == _channels_last_strides(x.shape):
        return x
    return x.clone(memory_format=torch.channels_last_3d)


def pad_channels_last(x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """``x`` [B, C, T, H, W] zero-padded by ``frames`` in front and ``height`` / ``width`` on both
    sides, as one new channels-last (NDHWC) tensor.

    Same values as ``F.pad``, in the layout the following channels-last conv needs (one
    copy, like ``F.pad``'s).  With only frames it is the official "group norm with zero
    pad" step.
    """
    b, c, t, h, w = x.shape
    out = torch.empty((b, c, t + frames, h + 2 * height, w + 2 * width), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    out[:, :, :frames].zero_()
    body = out[:, :, frames:]
    if height:
        body[:, :, :, :height].zero_()
        body[:, :, :, height + h:].zero_()
    if width:
        body[:, :, :, height:height + h, :width].zero_()
        body[:, :, :, height:height + h, width + w:].zero_()
    body[:, :, :, height:height + h, width:width + w].copy_(x)
    return out


class CausalConv(nn.Module):
    """``CausalConv``: a Conv3d (key ``conv``) that only sees the current and earlier frames.

    Zero padding: ``k_t - 1 + max(1 - stride_t, 0)`` frames in front, which keeps the
    frame count for stride 1 and gives ``(T - 1) // 2 + 1`` frames for stride 2, and
    ``k // 2`` on both sides in space.  The values never depend on the two switches
    below; the rounding does, so each conv is built the way the official code runs it:

    * ``pad_in_conv``: the conv pads in space itself (padding ``(0, k//2, k//2)``) and only
      the frames are added here, as the official ``CausalConvAfterNorm`` (res-block convs,
      decoder ``conv_out``); else all padding is done here and the conv pads nothing, as
      the official ``CausalConv`` / ``CausalConvChannelLast`` (fp32 stride-2 convs round
      differently with the conv's own padding).
    * ``channels_last``: the conv runs on a channels-last (NDHWC) (padded) input, as the
      official ``CausalConvAfterNorm`` / ``CausalConvChannelLast`` do; else on the input's
      own layout (``F.pad`` keeps it), as the official ``CausalConv`` does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTriple, operations,
                 stride: IntOrTriple = 1, device=None, dtype=None, channels_last: bool = False,
                 pad_in_conv: bool = False):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        stride = _triple(stride) if not isinstance(stride, int) else (stride, 1, 1)
        self.time_pad = (kt - 1) + max(1 - stride[0], 0)
        self.space_pad = (0, 0) if pad_in_conv else (kh // 2, kw // 2)
        self.channels_last = channels_last
        padding = (0, kh // 2, kw // 2) if pad_in_conv else 0
        self.conv = operations.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=stride,
                                      padding=padding, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.space_pad
        padded = self.time_pad or ph or pw
        if self.channels_last:
            x = pad_channels_last(x, self.time_pad, ph, pw) if padded else channels_last(x)
        elif padded:
            x = F.pad(x, (pw, pw, ph, ph, self.time_pad, 0))
        return self.conv(x)


class ResBlock(nn.Module):
    """``Resnet3DBlock``: conv2(SiLU(GN2(conv1(SiLU(GN1(x)))))) + shortcut(x), all causal.

    The shortcut is ``nin_shortcut`` (1x1x1 conv) when the width changes, else ``x``.
    No time embedding, no dropout.  Like the official ``CausalConvAfterNorm`` all three
    convs run channels-last and pad in space themselves.
    """

    def __init__(self, in_channels: int, out_channels: int, operations, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype, channels_last=True, pad_in_conv=True)
        self.norm1 = operations.GroupNorm(GROUPS, in_channels, eps=NORM_EPS, device=device, dtype=dtype)
        self.conv1 = CausalConv(in_channels, out_channels, 3, operations, **kw)
        self.norm2 = operations.GroupNorm(GROUPS, out_channels, eps=NORM_EPS, device=device, dtype=dtype)
        self.conv2 = CausalConv(out_channels, out_channels, 3, operations, **kw)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv(in_channels, out_channels, 1, operations, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(x, self.norm1))
        h = self.conv2(norm_silu(h, self.norm2))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(shortcut)


class MidAttention(nn.Module):
    """``AttnBlock``: single-head causal self-attention over all T*H*W positions, plus the input.

    Tokens are ordered (t, h, w) and position i attends to positions <= i (SDPA
    ``is_causal``; scale 1/sqrt(C)).  q, k, v and ``proj_out`` are 1x1x1 convs after a
    per-frame GroupNorm without activation.  As in the official code, q, k and v take
    the norm's output as it is and ``proj_out`` runs channels-last.
    """

    def __init__(self, channels: int, operations, device=None, dtype=None):
        super().__init__()
        self.norm = operations.GroupNorm(GROUPS, channels, eps=NORM_EPS, device=device, dtype=dtype)
        for name in ("q", "k", "v", "proj_out"):
            setattr(self, name, CausalConv(channels, channels, 1, operations, device=device, dtype=dtype,
                                           channels_last=name == "proj_out"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        hn = frame_group_norm(x, self.norm)
        q, k, v = (proj(hn).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        del hn
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        del q, k, v
        out = out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # tokens (t, h, w) x channels: NDHWC
        return self.proj_out(out).add_(x)


def _from_frames(y: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W] (a view; channels-last frames give a channels-last clip)."""
    bt, c, h, w = y.shape
    return y.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


def _empty_frames_channels_last(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An uninitialised [B*T, C, height, width] channels-last (NHWC) tensor for the frames of x [B, C, T, H, W]."""
    b, c, t = x.shape[:3]
    return torch.empty((b * t, c, height, width), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


class Downsample2D(nn.Module):
    """Per-frame spatial /2: pad one zero row/column at the bottom/right, Conv2d k3 s2 (key ``conv``).

    The padded frames are built channels-last (NHWC), the layout the official conv runs on.
    """

    def __init__(self, channels: int, operations, device=None, dtype=None):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        padded = _empty_frames_channels_last(x, h + 1, w + 1)  # one copy, like F.pad's
        frames = padded.view(b, t, c, h + 1, w + 1)
        frames[..., h, :].zero_()
        frames[..., :h, w].zero_()
        frames[..., :h, :w].copy_(x.transpose(1, 2))
        return _from_frames(self.conv(padded), b)


class Downsample3D(nn.Module):
    """/2 in time and space: causal Conv3d k3 stride 2 (key ``conv.conv``); T -> (T - 1) // 2 + 1."""

    def __init__(self, channels: int, operations, device=None, dtype=None):
        super().__init__()
        self.conv = CausalConv(channels, channels, 3, operations, stride=(2, 2, 2), device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def nearest_up2(x: torch.Tensor, time: bool) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling of [B, C, T, H, W] in H, W (and T when ``time``); one allocation."""
    b, c, t, h, w = x.shape
    ft = 2 if time else 1
    y = x[:, :, :, None, :, None, :, None].expand(b, c, t, ft, h, 2, w, 2)
    return y.reshape(b, c, t * ft, 2 * h, 2 * w)


class Upsample2D(nn.Module):
    """Per-frame nearest x2 in space then Conv2d k3 p1 (key ``conv``).

    The upsampled frames are written straight into a channels-last (NHWC) tensor, the
    layout the official conv runs on; the result is channels-last too.
    """

    def __init__(self, channels: int, operations, device=None, dtype=None):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = _empty_frames_channels_last(x, 2 * h, 2 * w)  # one allocation, as before
        src = x.transpose(1, 2)[:, :, :, :, None, :, None]
        frames.view(b, t, c, h, 2, w, 2).copy_(src.expand(b, t, c, h, 2, w, 2))
        return _from_frames(self.conv(frames), b)


class UpsampleResBlock(nn.Module):
    """``Res3DBlockUpsample`` (width kept): h = GN2(conv2(SiLU(GN1(conv1(x))))); out = SiLU(h + x) + x.

    Conv-then-norm order, and the input is added twice (once inside, once after the SiLU).
    Both convs run channels-last, like the official.
    """

    def __init__(self, channels: int, operations, device=None, dtype=None):
        super().__init__()
        self.conv1 = CausalConv(channels, channels, 3, operations, device=device, dtype=dtype, channels_last=True)
        self.norm1 = operations.GroupNorm(GROUPS, channels, eps=NORM_EPS, device=device, dtype=dtype)
        self.conv2 = CausalConv(channels, channels, 3, operations, device=device, dtype=dtype, channels_last=True)
        self.norm2 = operations.GroupNorm(GROUPS, channels, eps=NORM_EPS, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = norm_silu(self.conv1(x), self.norm1)
        h = frame_group_norm(self.conv2(h), self.norm2)
        h = F.silu(h.add_(x), inplace=True)
        return h.add_(x)


class Upsample3D(nn.Module):
    """Nearest x2 in time and space, then :class:`UpsampleResBlock` (key ``conv3d``)."""

    def __init__(self, channels: int, operations, device=None, dtype=None):
        super().__init__()
        self.conv3d = UpsampleResBlock(channels, operations, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(nearest_up2(x, time=True))


# --------------------------------------------------------------------------- (un)patchify

def unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Space/time-to-channel: [B, C, T, H, W] -> [B, C*f^3, (T+f-1)/f, H/f, W/f].

    ``f - 1`` zero frames are prepended first (so a 17-frame-derived 5 frames become 3).
    Channel index ``c * f^3 + (dt * f + dy) * f + dx``.
    """
    if factor == 1:
        return x
    x = F.pad(x, (0, 0, 0, 0, factor - 1, 0))
    b, c, t, h, w = x.shape
    f = factor
    x = x.reshape(b, c, t // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * f ** 3, t // f, h // f, w // f)


def shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`unshuffle` without the padding: [B, C*f^3, T, H, W] -> [B, C, T*f-(f-1), H*f, W*f].

    The first ``f - 1`` output frames are dropped (the causal counterpart of the zero frames).
    """
    if factor == 1:
        return x
    b, cf, t, h, w = x.shape
    f = factor
    c = cf // f ** 3
    x = x.reshape(b, c, f, f, f, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, t * f, h * f, w * f)[:, :, f - 1:]


def average_unshuffle(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Weightless encoder shortcut: :func:`unshuffle`, then the mean of each run of consecutive channels."""
    y = unshuffle(x, factor)
    b, c, t, h, w = y.shape
    return y.reshape(b, out_channels, c // out_channels, t, h, w).mean(dim=2)


def duplicate_shuffle(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Weightless decoder shortcut: repeat every channel (``repeat_interleave``) to out*f^3, then :func:`shuffle`."""
    repeats = out_channels * factor ** 3 // x.shape[1]
    return shuffle(x.repeat_interleave(repeats, dim=1), factor)


class PatchifyConv(nn.Module):
    """``conv_patchify`` (encoder): causal Conv3d k3 to ``out/8`` channels, then :func:`unshuffle` x2."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, operations, device=None, dtype=None):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(in_channels, out_channels // factor ** 3, 3, operations, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unshuffle(self.conv(x), self.factor)


class UnpatchifyConv(nn.Module):
    """``conv_unpatchify`` (decoder): causal Conv3d k3 to ``out*8`` channels, then :func:`shuffle` x2."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, operations, device=None, dtype=None):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(in_channels, out_channels * factor ** 3, 3, operations, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shuffle(self.conv(x), self.factor)
