"""The Step-Video-T2V diffusion transformer (official ``StepVideoModel``), own implementation.

Parameter names are the checkpoint's; ``build_transformer(None)`` on the meta
device has exactly the 785 tensors of the released 30B model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as default_ops
from ..attention import check_backend
from .blocks import StepVideoBlock
from .config import TIMESTEP_CHANNELS, TIMESTEP_RESCALE, StepVideoDiTConfig
from .rope import rope_tables


class PatchEmbed(nn.Module):
    """``pos_embed``: a p x p, stride-p Conv2d from latent channels to the model width."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size,
                                      device=device, dtype=dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> tokens [N, (H/p)(W/p), D], row-major."""
        return self.proj(latent).to(latent.dtype).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """``adaln_single.emb.timestep_embedder``: Linear -> SiLU -> Linear on 256 sinusoid features."""

    def __init__(self, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.linear_1 = operations.Linear(TIMESTEP_CHANNELS, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


def timestep_features(t: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoidal features [N, channels] in fp32, cosines first (flip_sin_to_cos, no freq shift)."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _EmbeddingWrapper(nn.Module):
    """Holds ``timestep_embedder`` so its keys are ``adaln_single.emb.timestep_embedder.*``."""

    def __init__(self, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim, operations, device, dtype)


class AdaLayerNormSingle(nn.Module):
    """``adaln_single``: sigma -> (t6 [B, 6D] shared by all blocks, embedded timestep e [B, D])."""

    def __init__(self, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.emb = _EmbeddingWrapper(dim, operations, device, dtype)
        self.linear = operations.Linear(dim, 6 * dim, device=device, dtype=dtype)

    def forward(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x1000 happens in sigma's own dtype (bf16 in the official pipeline); the
        # sinusoid is fp32 and its result is cast to the embedder's weight dtype.
        embedder = self.emb.timestep_embedder
        features = timestep_features(sigma * TIMESTEP_RESCALE).to(embedder.linear_1.weight.dtype)
        embedded = embedder(features)
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """``caption_projection``: Linear -> GELU(tanh) -> Linear (PixArt-alpha text projection)."""

    def __init__(self, in_features: int, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_features, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class StepVideoTransformer(nn.Module):
    """Step-Video-T2V DiT.  ``forward`` matches the official ``StepVideoModel.forward``.

    ``attention_backend`` selects the attention kernels (see :mod:`stepvideo_core.attention`).
    """

    def __init__(self, config: StepVideoDiTConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        affine = config.norm_elementwise_affine
        self._attention_backend = "sdpa"
        self.pos_embed = PatchEmbed(config.patch_size, config.in_channels, dim, operations, device, dtype)
        self.transformer_blocks = nn.ModuleList(
            [StepVideoBlock(dim, config.attention_head_dim, operations, device, dtype)
             for _ in range(config.num_layers)])
        self.norm_out = operations.LayerNorm(dim, eps=config.norm_eps, elementwise_affine=affine,
                                             device=device, dtype=dtype)
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim, device=device, dtype=dtype),
                                              requires_grad=False)
        self.proj_out = operations.Linear(dim, config.patch_size ** 2 * config.out_channels,
                                          device=device, dtype=dtype)
        self.adaln_single = AdaLayerNormSingle(dim, operations, device, dtype)
        if config.clip_dim is not None:
            self.clip_projection = operations.Linear(config.clip_dim, dim, device=device, dtype=dtype)
        self.caption_norm = operations.LayerNorm(config.caption_dim, eps=config.norm_eps,
                                                 elementwise_affine=affine, device=device, dtype=dtype)
        self.caption_projection = CaptionProjection(config.caption_dim, dim, operations, device, dtype)
        self.requires_grad_(False)

    # -- properties --------------------------------------------------------------
    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        # checks the install now; device/dtype limits are checked per call
        self._attention_backend = check_backend(name)

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype activations run in (the modulation table never leaves it, even with fp8 weights)."""
        return self.scale_shift_table.dtype

    def num_parameters(self) -> int:
        """Number of weights (elements), as the checkpoint counts them."""
        return sum(p.numel() for p in self.parameters())

    # -- forward -----------------------------------------------------------------
    def text_context(self, encoder_hidden_states: torch.Tensor,
                     encoder_hidden_states_2: Optional[torch.Tensor],
                     encoder_attention_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Projected context [B, S, D] (CLIP tokens first, then Step-LLM) and its mask [B, 1, 1, S].

        Like the official model, the mask only contributes per-sample *counts*:
        the context is cut to the longest valid length and position j is valid
        for sample b when j < count_b.  Counts are summed in the mask's own dtype
        (the official pipeline passes it in the compute dtype).
        """
        context = self.caption_projection(self.caption_norm(encoder_hidden_states))
        if encoder_hidden_states_2 is not None and hasattr(self, "clip_projection"):
            context = torch.cat([self.clip_projection(encoder_hidden_states_2), context], dim=1)
        if encoder_attention_mask is None:
            return context, None
        if encoder_attention_mask.shape != context.shape[:2]:
            raise ValueError(f"encoder_attention_mask must be [B, {context.shape[1]}] (77 CLIP ones followed "
                             f"by the Step-LLM mask), got {list(encoder_attention_mask.shape)}")
        lengths = encoder_attention_mask.sum(dim=1).int()
        longest = int(lengths.max())
        positions = torch.arange(longest, device=context.device)
        mask = (positions[None, :] < lengths[:, None].to(context.device))[:, None, None, :]
        return context[:, :longest], mask

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_hidden_states_2: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity [B, F, C, H, W] for latents ``hidden_states`` [B, F, C, H, W] at sigma ``timestep`` [B].

        Activations are cast to :attr:`compute_dtype`; ``timestep`` keeps its
        dtype for the x1000 (as the official forward does).
        """
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, F, C, H, W], got shape {list(hidden_states.shape)}")
        dtype = self.compute_dtype
        batch, frames, _, height, width = hidden_states.shape
        p = self.config.patch_size
        h, w = height // p, width // p

        x = self.pos_embed(hidden_states.to(dtype).reshape(batch * frames, *hidden_states.shape[2:]))
        x = x.reshape(batch, frames * h * w, -1).contiguous()
        t6, embedded = self.adaln_single(timestep.to(hidden_states.device).reshape(-1).expand(batch))
        context, mask = self.text_context(
            encoder_hidden_states.to(dtype),
            None if encoder_hidden_states_2 is None else encoder_hidden_states_2.to(dtype),
            encoder_attention_mask)
        rope = rope_tables(frames, h, w, dtype, x.device)

        holder = [x]
        del x
        x = self.run_blocks(holder, context, t6, rope, mask)
        return self.final_layer(x, embedded, batch, frames, h, w)

    def run_blocks(self, holder: list, context: torch.Tensor, t6: torch.Tensor, rope: tuple,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
        """All transformer blocks in order on the tokens in ``holder`` (a one-element list); returns the output.

        The tensor is handed over in a list and taken out here so that no caller frame keeps
        the embedded input alive beside the residual stream: one hidden-state copy less at
        the peak of every block (1.9 GB at 544x992x204 with batched CFG).
        """
        x = holder.pop()
        for block in self.transformer_blocks:
            x = block(x, context, t6, rope, mask, self._attention_backend)
        return x

    def final_layer(self, x: torch.Tensor, embedded: torch.Tensor, batch: int, frames: int,
                    h: int, w: int) -> torch.Tensor:
        """Final modulated norm (with e itself, no SiLU), ``proj_out`` and un-patchify -> [B, F, C, H, W]."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(batch * frames, h * w, -1)
        embedded = embedded.repeat_interleave(frames, dim=0)
        shift, scale = (self.scale_shift_table.to(embedded.device)[None] + embedded[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x).mul_(1 + scale).add_(shift))  # in place, same values
        x = x.reshape(batch * frames, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, frames, c, h * p, w * p)


def build_transformer(config: Union[None, Mapping[str, Any], StepVideoDiTConfig] = None,
                      device: Union[str, torch.device] = "meta", dtype: Optional[torch.dtype] = None,
                      operations=default_ops.plain, model_class: type = StepVideoTransformer) -> StepVideoTransformer:
    """The DiT without weights (``meta`` by default: no memory) for ``config``.

    ``None`` gives the released 30B config; a dict takes config.json's keys.
    Weights on a real device are uninitialised until loaded.  ``model_class`` is
    :class:`StepVideoTransformer` or a subclass of it (same modules and names, e.g. one
    adding another calling convention on top).
    """
    if config is None:
        config = StepVideoDiTConfig()
    elif not isinstance(config, StepVideoDiTConfig):
        config = StepVideoDiTConfig.from_dict(config)
    if not (isinstance(model_class, type) and issubclass(model_class, StepVideoTransformer)):
        raise TypeError(f"model_class must be StepVideoTransformer or a subclass, got {model_class!r}")
    return model_class(config, operations=operations, device=device, dtype=dtype).eval()
