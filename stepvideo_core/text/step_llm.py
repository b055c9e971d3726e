"""Step-LLM (``step_llm/``), the 19.6B bilingual text encoder, in pure PyTorch.

A pre-norm decoder without positional embeddings and without a final norm:
the encoder output is the raw residual stream after the last layer.

Attention replaces StepFun's closed CUDA op (``torch.ops.Optimus.fwd``, shipped
only as a Linux/CUDA ``.so``).  Step-LLM has no other source of position
information, so the op must carry a position bias; our best knowledge of it is
StepFun's own pure-PyTorch fallback for the same op in the Step-1 family:
causal softmax attention with the additive bias ``-slope_h * sqrt(i - j)`` and
standard ALiBi slopes.  **This bias is inferred, not verified against the .so**
(no GPU with the binary was available); ``alibi=False`` runs plain causal
attention (what DiffSynth falls back to) for comparison.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as default_ops
from ..layers import RMSNorm

_META_KEYS = {"architectures", "model_type", "transformers_version", "torch_dtype", "_name_or_path", "auto_map"}


@dataclass
class StepLLMConfig:
    """``step_llm/config.json`` fields; defaults = the released 19.6B encoder."""

    hidden_size: int = 6144
    num_layers: int = 48
    num_attention_heads: int = 48
    num_attention_groups: int = 8
    ffn_hidden_size: int = 16896
    layernorm_epsilon: float = 1e-5
    padded_vocab_size: int = 65536
    seq_length: int = 16384
    params_dtype: str = "bfloat16"
    use_flash_attn: bool = True
    attention_impl: str = "GQA"
    embedding_weights_in_fp32: bool = False
    fp32_residual_connection: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_attention_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_attention_groups {self.num_attention_groups}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_inner(self) -> int:
        """SwiGLU width (:func:`swiglu_width` of ``ffn_hidden_size``)."""
        return swiglu_width(self.ffn_hidden_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepLLMConfig":
        """From config.json contents; unknown keys are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _META_KEYS)
        if unknown:
            warnings.warn(f"Step-LLM config: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def swiglu_width(ffn_hidden_size: int) -> int:
    """The SwiGLU width for config.json's ``ffn_hidden_size``: rounded up to a multiple of 256
    (16896 stays 16896).  A function so the loader can apply it to an unvalidated config value."""
    return 256 * math.ceil(ffn_hidden_size / 256)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi slopes [n_heads] (fp32): 2^(-8k/n) for the largest power of two n <= n_heads,
    then 2^(-4(2m-1)/n) for the remaining heads (48 heads: 32 + 16)."""
    n = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * (2 * m - 1) / n) for m in range(1, n_heads - n + 1)]
    return torch.tensor(slopes, dtype=torch.float32)


def causal_bias(n_heads: int, length: int, alibi: bool, device=None) -> torch.Tensor:
    """Additive fp32 attention bias: -inf above the diagonal; on and below it
    -slope_h*sqrt(i-j) as [n_heads, length, length] when ``alibi``, else 0 as one
    [length, length] matrix that broadcasts over the heads.

    The plain causal bias has no head dimension on purpose: that is the shape the
    official stand-in hands SDPA, and SDPA on CPU rounds a per-head [H, S, S] mask
    differently (up to 7.6e-3 relative in bf16), so the shape is part of the arithmetic.
    """
    i = torch.arange(length, device=device).view(-1, 1)
    j = torch.arange(length, device=device).view(1, -1)
    if alibi:
        distance = (i - j).clamp(min=0).float().sqrt()
        bias = -alibi_slopes(n_heads).to(device).view(-1, 1, 1) * distance
    else:
        bias = torch.zeros(length, length, device=device)
    return bias.masked_fill(j > i, float("-inf"))


class GroupedQueryAttention(nn.Module):
    """``attention``: fused ``wqkv`` rows = [q: heads x d | per group: k (d), v (d)], then ``wo``."""

    def __init__(self, cfg: StepLLMConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.n_heads, self.n_groups, self.head_dim = cfg.num_attention_heads, cfg.num_attention_groups, cfg.head_dim
        kv_rows = 2 * self.head_dim * self.n_groups
        self.wqkv = operations.Linear(cfg.hidden_size, cfg.hidden_size + kv_rows, bias=False, device=device,
                                      dtype=dtype)
        self.wo = operations.Linear(cfg.hidden_size, cfg.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], bias [H, S, S] or [S, S] -> [B, S, D]; softmax in fp32 (scale 1/sqrt(head_dim))."""
        b, s, d = x.shape
        q, kv = torch.split(self.wqkv(x), [d, 2 * self.head_dim * self.n_groups], dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim)
        k, v = kv.view(b, s, self.n_groups, 2 * self.head_dim).chunk(2, dim=-1)
        repeat = self.n_heads // self.n_groups  # query head j reads KV group j // repeat
        k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.head_dim ** -0.5)
        return self.wo(out.transpose(1, 2).reshape(b, s, d).to(x.dtype))


class SwiGLU(nn.Module):
    """``feed_forward``: silu(a) * b with (a, b) the two halves of ``w1``'s output (gate first), then ``w2``."""

    def __init__(self, cfg: StepLLMConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.w1 = operations.Linear(cfg.hidden_size, 2 * cfg.ffn_inner, bias=False, device=device, dtype=dtype)
        self.w2 = operations.Linear(cfg.ffn_inner, cfg.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * value)


class StepLLMLayer(nn.Module):
    """``transformer.layers.{i}``: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, cfg: StepLLMConfig, operations=default_ops.plain, device=None, dtype=None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, device=device, dtype=dtype)
        self.attention = GroupedQueryAttention(cfg, operations, device, dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, device=device, dtype=dtype)
        self.feed_forward = SwiGLU(cfg, operations, device, dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), bias)
        return h + self.feed_forward(self.ffn_norm(h))


class _Embedding(nn.Module):
    """Holds ``word_embeddings`` so its key is ``tok_embeddings.word_embeddings.weight``."""

    def __init__(self, cfg: StepLLMConfig, device=None, dtype=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size, device=device, dtype=dtype,
                                            _freeze=True)


class _Layers(nn.Module):
    """Holds the layers so their keys are ``transformer.layers.{i}.*``."""

    def __init__(self, cfg: StepLLMConfig, operations, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList([StepLLMLayer(cfg, operations, device, dtype) for _ in range(cfg.num_layers)])


class StepLLM(nn.Module):
    """Step-LLM encoder: ``llm(input_ids [B, S]) -> last hidden state [B, S, D]``.

    It takes no attention mask, because the official model never applies one: its
    ``Step1Model.forward`` accepts ``attention_mask``, but the flash-attention path its
    layers assert calls the kernel with q, k, v and ``causal=True`` only.  Prompts are right-padded and
    attention is causal, so valid tokens never see pads, and the pad positions' outputs
    (kept, as the official ones are) are masked later, in the DiT's cross-attention by
    the tokenizer's mask.  Masking keys here would change those pad outputs and so the
    parity with the official encoder.
    """

    def __init__(self, config: StepLLMConfig, operations=default_ops.plain, device=None, dtype=None,
                 alibi: bool = True):
        super().__init__()
        self.config = config
        self.alibi = alibi
        self.tok_embeddings = _Embedding(config, device, dtype)
        self.transformer = _Layers(config, operations, device, dtype)
        self.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, S, D]."""
        return self.tok_embeddings.word_embeddings(input_ids)

    def attention_bias(self, length: int, device) -> torch.Tensor:
        """The causal (sqrt-ALiBi unless ``alibi`` is False) bias shared by all layers."""
        return causal_bias(self.config.num_attention_heads, length, self.alibi, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The last hidden state [B, S, D] of ``input_ids`` [B, S] (causal attention, no mask: see the class)."""
        x = self.embed(input_ids)
        bias = self.attention_bias(input_ids.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def build_step_llm(config: Union[None, Mapping[str, Any], StepLLMConfig] = None,
                   device: Union[str, torch.device] = "meta", dtype: Optional[torch.dtype] = None,
                   operations=default_ops.plain, alibi: bool = True) -> StepLLM:
    """Step-LLM without weights (meta by default). ``None`` = the released 19.6B config."""
    if config is None:
        config = StepLLMConfig()
    elif not isinstance(config, StepLLMConfig):
        config = StepLLMConfig.from_dict(config)
    return StepLLM(config, operations=operations, device=device, dtype=dtype, alibi=alibi).eval()
