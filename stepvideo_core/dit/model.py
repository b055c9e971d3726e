"""The Step-Video diffusion transformer (official ``StepVideoModel``), own implementation.

Parameter names are the checkpoint's; ``build_transformer(None)`` on the meta
device has exactly the 785 tensors of the released 30B Step-Video-T2V model.
The same class is Step-Video-TI2V (image-to-video) when the config says
``use_additional_conditions=True`` (:attr:`StepVideoTransformer.is_ti2v`): the
patch embed then takes the noisy latents and the first-frame condition
concatenated on the channel axis, and a motion score is embedded next to the
timestep (reference ``stepvideo-ti2v.md`` section 1).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as default_ops
from ..attention import Resolved, check_backend, resolve_backend
from ..checks import count_non_finite, finite_float
from .blocks import StepVideoBlock
from .config import TIMESTEP_CHANNELS, TIMESTEP_RESCALE, StepVideoDiTConfig
from .rope import rope_tables

ROPE_CACHE_SIZE = 2  # RoPE table sets a model keeps (a run needs one: its video size, device and dtype)


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
    """Holds ``timestep_embedder`` (and for TI2V ``motion_score_embedder``) under ``adaln_single.emb.*``."""

    def __init__(self, dim: int, operations, device=None, dtype=None, motion_score: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim, operations, device, dtype)
        if motion_score:
            self.motion_score_embedder = TimestepEmbedder(dim, operations, device, dtype)


class AdaLayerNormSingle(nn.Module):
    """``adaln_single``: sigma (and the TI2V motion score) -> (t6 [B, 6D] shared by all blocks, e [B, D]).

    With ``motion_score=True`` (Step-Video-TI2V) the motion score goes through the same 256-channel
    sinusoid as the timestep (not scaled by 1000), its own embedder, and is added to the timestep
    embedding before the 6-way modulation linear, so both ``t6`` and ``e`` depend on it.
    """

    def __init__(self, dim: int, operations, device=None, dtype=None, motion_score: bool = False):
        super().__init__()
        self.emb = _EmbeddingWrapper(dim, operations, device, dtype, motion_score)
        self.linear = operations.Linear(dim, 6 * dim, device=device, dtype=dtype)

    @property
    def has_motion_score(self) -> bool:
        """True when this AdaLN-single embeds a motion score (the TI2V model)."""
        return hasattr(self.emb, "motion_score_embedder")

    def forward(self, sigma: torch.Tensor, motion_score: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t6, e) for ``sigma`` [B] and, on TI2V, ``motion_score`` [B] (already in the compute dtype)."""
        # x1000 happens in sigma's own dtype (bf16 in the official pipeline); the
        # sinusoid is fp32 and its result is cast to the embedder's weight dtype.
        embedder = self.emb.timestep_embedder
        hidden_dtype = embedder.linear_1.weight.dtype
        embedded = embedder(timestep_features(sigma * TIMESTEP_RESCALE).to(hidden_dtype))
        if self.has_motion_score:
            if motion_score is None:
                raise ValueError("the Step-Video-TI2V AdaLN-single needs a motion_score")
            # the score as given (rounded to the compute dtype by the caller), no x1000, same fp32 sinusoid
            motion = self.emb.motion_score_embedder(timestep_features(motion_score.flatten()).to(hidden_dtype))
            embedded = embedded + motion.reshape(sigma.shape[0], -1)
        elif motion_score is not None:
            raise ValueError("this AdaLN-single has no motion_score_embedder (a Step-Video-T2V model): "
                             "it takes no motion_score")
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """``caption_projection``: Linear -> GELU(tanh) -> Linear (PixArt-alpha text projection)."""

    def __init__(self, in_features: int, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_features, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def context_lengths(encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """Valid text tokens per sample [B] (int32): the mask summed in its own dtype, as the official model counts.

    One function for the model and for callers that count on the host beforehand (the sampler
    passes the longest as ``context_length``, so the model need not read it back from the device).
    """
    return encoder_attention_mask.sum(dim=1).int()


def longest_context(encoder_attention_mask: torch.Tensor) -> int:
    """The longest valid text length of ``encoder_attention_mask`` [B, S] (a host read of the mask's device)."""
    return int(context_lengths(encoder_attention_mask).max())


class StepVideoTransformer(nn.Module):
    """Step-Video DiT (T2V, Turbo, or TI2V when :attr:`is_ti2v`).  ``forward`` matches the official
    ``StepVideoModel.forward``.

    ``attention_backend`` selects the attention kernels (see :mod:`stepvideo_core.attention`).
    """

    def __init__(self, config: StepVideoDiTConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        affine = config.norm_elementwise_affine
        self._attention_backend = "sdpa"
        self._resolved_backends: dict = {}     # (device, dtype) -> Resolved: "auto" & co. checked once
        self._rope_cache: OrderedDict = OrderedDict()  # (frames, h, w, device, dtype, inference) -> tables
        self.rope_builds = 0                   # RoPE table sets built so far (tests, diagnostics)
        self.pos_embed = PatchEmbed(config.patch_size, config.patch_in_channels, dim, operations, device, dtype)
        self.transformer_blocks = nn.ModuleList(
            [StepVideoBlock(dim, config.attention_head_dim, operations, device, dtype)
             for _ in range(config.num_layers)])
        self.norm_out = operations.LayerNorm(dim, eps=config.norm_eps, elementwise_affine=affine,
                                             device=device, dtype=dtype)
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim, device=device, dtype=dtype),
                                              requires_grad=False)
        self.proj_out = operations.Linear(dim, config.patch_size ** 2 * config.out_channels,
                                          device=device, dtype=dtype)
        self.adaln_single = AdaLayerNormSingle(dim, operations, device, dtype, motion_score=config.is_ti2v)
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
        # checks the install now; device/dtype limits are checked once per (device, dtype) in resolved_attention
        self._attention_backend = check_backend(name)
        self._resolved_backends = {}

    def resolved_attention(self, device: torch.device, dtype: torch.dtype) -> Resolved:
        """:attr:`attention_backend` resolved for activations on (``device``, ``dtype``), once per pair.

        Exists so that ``"auto"`` (two ``importlib`` look-ups, ~2 ms) and the checks of an explicit
        backend run once per model and device instead of in each of the 2 x 48 attention calls of a
        forward.  The result compares equal to the requested name and carries the kernel the
        unmasked calls run (:class:`~stepvideo_core.attention.Resolved`); raises
        AttentionBackendError when an explicit backend cannot run on this device or dtype.
        """
        key = (self._attention_backend, device, dtype)
        found = self._resolved_backends.get(key)
        if found is None:
            kernel = resolve_backend(self._attention_backend, device, dtype, masked=False)
            found = self._resolved_backends[key] = Resolved(self._attention_backend, kernel)
        return found

    def rope(self, frames: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> tuple:
        """The RoPE tables for a ``frames`` x ``h`` x ``w`` token grid, built once and kept (see below).

        Identical at every step of a run, so they are kept per (grid, device, dtype) -- at most
        :data:`ROPE_CACHE_SIZE` sets, the oldest dropped first.  Tables built under
        ``torch.inference_mode`` are kept apart from others (inference tensors cannot enter
        autograd), and nothing is kept while autograd records.  :meth:`clear_rope_cache` (called
        by the block streamer when a run ends, and by any ``.to()`` of the model) drops them.
        """
        key = (frames, h, w, torch.device(device), dtype, torch.is_inference_mode_enabled())
        found = self._rope_cache.get(key)
        if found is not None:
            self._rope_cache.move_to_end(key)
            return found
        found = rope_tables(frames, h, w, dtype, device)
        self.rope_builds += 1
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            self._rope_cache[key] = found
            while len(self._rope_cache) > ROPE_CACHE_SIZE:
                self._rope_cache.popitem(last=False)
        return found

    def clear_rope_cache(self) -> None:
        """Drop the kept RoPE tables (they may sit on an accelerator)."""
        self._rope_cache.clear()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half(): the kept RoPE tables (and resolutions) belong to the old placement
        self.clear_rope_cache()
        self._resolved_backends = {}
        return super()._apply(fn, *args, **kwargs)

    @property
    def is_ti2v(self) -> bool:
        """True for Step-Video-TI2V: :meth:`forward` then needs ``condition_hidden_states`` and ``motion_score``."""
        return self.config.is_ti2v

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
                     encoder_attention_mask: Optional[torch.Tensor],
                     context_length: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Projected context [B, S, D] (CLIP tokens first, then Step-LLM) and its mask [B, 1, 1, S].

        Like the official model, the mask only contributes per-sample *counts*:
        the context is cut to the longest valid length and position j is valid
        for sample b when j < count_b.  Counts are summed in the mask's own dtype
        (the official pipeline passes it in the compute dtype).  ``context_length``, when
        given, is that longest length as the caller counted it on the host
        (:func:`longest_context` of the same mask in the same dtype), which spares reading
        it back from the device; it must be the mask's own (it is trusted, not checked).
        """
        context = self.caption_projection(self.caption_norm(encoder_hidden_states))
        if encoder_hidden_states_2 is not None and hasattr(self, "clip_projection"):
            context = torch.cat([self.clip_projection(encoder_hidden_states_2), context], dim=1)
        if encoder_attention_mask is None:
            return context, None
        if encoder_attention_mask.shape != context.shape[:2]:
            raise ValueError(f"encoder_attention_mask must be [B, {context.shape[1]}] (77 CLIP ones followed "
                             f"by the Step-LLM mask), got {list(encoder_attention_mask.shape)}")
        lengths = context_lengths(encoder_attention_mask)
        longest = int(lengths.max()) if context_length is None else int(context_length)
        positions = torch.arange(longest, device=context.device)
        mask = (positions[None, :] < lengths[:, None].to(context.device))[:, None, None, :]
        return context[:, :longest], mask

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_hidden_states_2: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                condition_hidden_states: Optional[torch.Tensor] = None,
                motion_score: Union[None, float, torch.Tensor] = None,
                context_length: Optional[int] = None) -> torch.Tensor:
        """Velocity [B, F, C, H, W] for latents ``hidden_states`` [B, F, C, H, W] at sigma ``timestep`` [B].

        Activations are cast to :attr:`compute_dtype`; ``timestep`` keeps its
        dtype for the x1000 (as the official forward does).  A TI2V model (:attr:`is_ti2v`)
        also takes ``condition_hidden_states`` [B, F, C, H, W] (the first-frame image latent
        followed by zeros; batch 1 is repeated to B), concatenated to the latents on the channel
        axis before the patch embed, and ``motion_score``, a number (or a one-element or [B]
        tensor) that becomes ``tensor([score]).repeat(B)`` in the compute dtype -- rounded to bf16
        in bf16, as officially -- before the sinusoid.  Raises ValueError when a TI2V model lacks
        them or a T2V model is given them.  ``context_length``: the longest valid text length of
        ``encoder_attention_mask``, when the caller knows it (see :meth:`text_context`).
        """
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, F, C, H, W], got shape {list(hidden_states.shape)}")
        dtype = self.compute_dtype
        batch, frames, _, height, width = hidden_states.shape
        p = self.config.patch_size
        h, w = height // p, width // p
        self.check_image_inputs(hidden_states, condition_hidden_states, motion_score)

        patch_input = hidden_states.to(dtype)
        if condition_hidden_states is not None:
            condition = condition_hidden_states.to(device=patch_input.device, dtype=dtype)
            if condition.shape[0] != batch:
                condition = condition.expand(batch, *condition.shape[1:])
            patch_input = torch.cat([patch_input, condition], dim=2)
            del condition
        x = self.pos_embed(patch_input.reshape(batch * frames, *patch_input.shape[2:]))
        del patch_input
        x = x.reshape(batch, frames * h * w, -1).contiguous()
        motion = None if motion_score is None else motion_score_tensor(motion_score, batch, dtype, x.device)
        t6, embedded = self.adaln_single(timestep.to(hidden_states.device).reshape(-1).expand(batch), motion)
        context, mask = self.text_context(
            encoder_hidden_states.to(dtype),
            None if encoder_hidden_states_2 is None else encoder_hidden_states_2.to(dtype),
            encoder_attention_mask, context_length)
        rope = self.rope(frames, h, w, dtype, x.device)

        holder = [x]
        del x
        x = self.run_blocks(holder, context, t6, rope, mask)
        return self.final_layer(x, embedded, batch, frames, h, w)

    def check_image_inputs(self, hidden_states: torch.Tensor, condition_hidden_states: Optional[torch.Tensor],
                           motion_score) -> None:
        """Raise ValueError unless the image-to-video inputs fit this model: both on TI2V, neither on T2V.

        Exists so that a TI2V checkpoint run as T2V (or the reverse) says which model it is and what
        is missing or superfluous, instead of failing inside the patch embed's convolution.
        """
        given = [name for name, value in (("condition_hidden_states", condition_hidden_states),
                                          ("motion_score", motion_score)) if value is not None]
        if not self.is_ti2v:
            if given:
                raise ValueError(f"this is a Step-Video-T2V transformer ({self.config.in_channels}-channel patch "
                                 f"embed, no motion_score_embedder): it takes no {' or '.join(given)}. "
                                 f"Image-to-video needs a Step-Video-TI2V transformer.")
            return
        missing = [name for name in ("condition_hidden_states", "motion_score") if name not in given]
        if missing:
            raise ValueError(f"this is a Step-Video-TI2V (image-to-video) transformer: it needs "
                             f"condition_hidden_states [B, F, {self.config.in_channels}, H, W] (the first-frame "
                             f"image latent, then zeros) and motion_score (e.g. 5.0); missing: "
                             f"{', '.join(missing)}")
        expected = tuple(hidden_states.shape[1:])
        found = tuple(condition_hidden_states.shape)
        if len(found) != 5 or found[1:] != expected or found[0] not in (1, hidden_states.shape[0]):
            raise ValueError(f"condition_hidden_states must be [{hidden_states.shape[0]} (or 1), "
                             f"{', '.join(map(str, expected))}] like the latents, got {list(found)}")

    def run_blocks(self, holder: list, context: torch.Tensor, t6: torch.Tensor, rope: tuple,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
        """All transformer blocks in order on the tokens in ``holder`` (a one-element list); returns the output.

        The tensor is handed over in a list and taken out here so that no caller frame keeps
        the embedded input alive beside the residual stream: one hidden-state copy less at
        the peak of every block (1.9 GB at 544x992x204 with batched CFG).
        """
        x = holder.pop()
        backend = self.resolved_attention(x.device, x.dtype)
        for block in self.transformer_blocks:
            x = block(x, context, t6, rope, mask, backend)
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


def motion_score_tensor(score: Union[float, torch.Tensor], batch: int, dtype: torch.dtype,
                        device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The TI2V motion score as the model embeds it: ``tensor([score]).repeat(batch)`` in ``dtype`` [batch].

    A number (or a one-element tensor) is rounded to ``dtype`` once, exactly as the official
    forward builds it (bf16 in the pipeline: 5.3 becomes 5.3125); a [batch] tensor gives one
    score per sample.  Raises ValueError for a NaN/Inf score or a tensor of another size.
    """
    if isinstance(score, torch.Tensor):
        if score.numel() == batch and batch > 1:
            values = score.detach().reshape(batch).to(device=device, dtype=dtype)
            if count_non_finite(values):
                raise ValueError(f"motion_score must be finite, got {score.tolist()}")
            return values
        if score.numel() != 1:
            raise ValueError(f"motion_score must be a number, a one-element tensor or one score per sample "
                             f"([{batch}]), got a tensor of shape {list(score.shape)}")
        score = score.detach().reshape(()).item()
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        raise ValueError(f"motion_score must be a number (e.g. 5.0), got {type(score).__name__}")
    # a fill, not torch.tensor([score], device=...): no host->device copy (a stream sync) per forward;
    # the number is rounded to ``dtype`` by the same conversion either way
    return torch.full((batch,), finite_float(score, "motion_score"), device=device, dtype=dtype)


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
