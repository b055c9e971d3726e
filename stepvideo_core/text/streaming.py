"""Running the Step-LLM where it fits: resident on the GPU, streamed layer by layer, or on the CPU.

The 19.6B Step-LLM is 39.2 GB in bf16, more than a 24 GB GPU holds, but it runs
once per prompt, so copying its weights to the GPU one layer at a time (0.8 GB
each) costs seconds, not minutes.  Three plans:

* ``resident``: all layer weights on the compute device for the call (already
  there when the model was loaded there; otherwise copied once for the call);
* ``stream``: one layer's weights copied to the compute device, run, dropped;
* ``cpu``: everything on the CPU (no GPU, or too little free memory).

The resting module is never changed: a layer runs through
``torch.func.functional_call`` with device copies of its own tensors.  The
token embedding is looked up where the table rests (the CPU, usually) and only
the [B, S, D] result is moved.  :func:`plan` is the pure decision used by ``auto``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.func import functional_call

from .step_llm import StepLLM, StepLLMConfig, causal_bias

PLANS = ("auto", "resident", "stream", "cpu")
GiB = 1 << 30
# Kept free beyond the estimate: CUDA context, allocator fragmentation, kernels' workspaces.
DEFAULT_HEADROOM = GiB


def plan(free_vram: Optional[int], model_bytes: int, activation_bytes: int, layer_bytes: int,
         headroom: int = DEFAULT_HEADROOM) -> str:
    """Return "resident", "stream" or "cpu" for the given memory figures (all in bytes).

    ``free_vram`` None or 0 means there is no usable GPU.  Resident needs all
    ``model_bytes`` (weights still to be placed on the GPU) plus activations and
    headroom; streaming needs one layer plus activations and headroom.  Pure, so
    it can be checked on known numbers.
    """
    if not free_vram or free_vram <= 0:
        return "cpu"
    if model_bytes + activation_bytes + headroom <= free_vram:
        return "resident"
    if layer_bytes + activation_bytes + headroom <= free_vram:
        return "stream"
    return "cpu"


def tensor_bytes(module: nn.Module, not_on: Optional[torch.device] = None) -> int:
    """Bytes of ``module``'s parameters and buffers (only those not already on ``not_on``, if given)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if not_on is None or t.device != not_on)


def activation_bytes(config: StepLLMConfig, batch: int, length: int, dtype: torch.dtype) -> int:
    """Upper estimate of the live activations of one layer call (bytes), for :func:`plan`.

    Counts the residual stream and its norm, the fused qkv output, q/k/v expanded
    to all heads in fp32, the fp32 scores and bias (materialised by SDPA's math
    path), the attention output, and SwiGLU's w1 output and product.
    """
    item = torch.empty((), dtype=dtype).element_size()
    d, h, f = config.hidden_size, config.num_attention_heads, config.ffn_inner
    tokens = batch * length
    kv = 2 * config.head_dim * config.num_attention_groups
    elements_dtype = tokens * (3 * d + (d + kv) + 2 * f + f)
    elements_fp32 = 4 * tokens * d + batch * h * length * length + h * length * length
    return elements_dtype * item + 4 * elements_fp32


def on_device(module: nn.Module, device: torch.device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s parameters and buffers on ``device`` by name (the same tensors when already there)."""
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    return {k: v.to(device, non_blocking=non_blocking) for k, v in named.items()}


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stream_bytes(llm: StepLLM, batch: int, length: int) -> int:
    """Device memory (bytes) the ``stream`` plan needs: the largest layer, activations and headroom."""
    dtype = llm.tok_embeddings.word_embeddings.weight.dtype
    largest = max(tensor_bytes(layer) for layer in llm.layers)
    return largest + activation_bytes(llm.config, batch, length, dtype) + DEFAULT_HEADROOM


def choose_plan(llm: StepLLM, device: Union[str, torch.device], batch: int, length: int,
                free_vram: Optional[int]) -> str:
    """The ``auto`` decision for running ``llm`` on ``device`` now (see :func:`plan`)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    layers = llm.layers
    model_bytes = tensor_bytes(layers, not_on=device)
    if model_bytes == 0:
        return "resident"  # loaded on the device already
    dtype = next(llm.parameters()).dtype
    largest = max(tensor_bytes(layer) for layer in layers)
    return plan(free_vram, model_bytes, activation_bytes(llm.config, batch, length, dtype), largest)


@torch.no_grad()
def run_step_llm(llm: StepLLM, input_ids: torch.Tensor, device: Union[str, torch.device], mode: str,
                 alibi: Optional[bool] = None,
                 on_layer: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Last hidden state [B, S, D] of ``llm`` for ``input_ids``, computed on ``device`` per ``mode``.

    ``mode`` is "resident", "stream" or "cpu" (which forces ``device`` to the CPU).
    ``alibi`` overrides the model's bias switch without touching the model.
    ``on_layer(i, n)`` is called after each layer (progress, interrupts).  Every
    mode runs the same operations, so on one device they agree bit for bit.
    """
    if mode not in ("resident", "stream", "cpu"):
        raise ValueError(f"mode must be 'resident', 'stream' or 'cpu', got {mode!r}")
    device = torch.device("cpu") if mode == "cpu" else torch.device(device)
    alibi = llm.alibi if alibi is None else alibi
    table = llm.tok_embeddings.word_embeddings.weight
    x = llm.embed(input_ids.to(table.device)).to(device)
    bias = causal_bias(llm.config.num_attention_heads, input_ids.shape[1], alibi, device)
    layers = list(llm.layers)
    resident = [on_device(layer, device) for layer in layers] if mode != "stream" else None
    for i, layer in enumerate(layers):
        if resident is not None:
            weights, resident[i] = resident[i], None  # drop device copies as soon as they are used
        else:
            weights = on_device(layer, device, non_blocking=True)
        x = functional_call(layer, weights, (x, bias))
        del weights
        if on_layer is not None:
            on_layer(i + 1, len(layers))
    return x
