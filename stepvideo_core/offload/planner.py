"""Automatic memory plan: how many transformer blocks can stay on the GPU.

A pure, JSON-friendly function of numbers and strings (no torch, no device
queries), so the sampler node, scripts and later the web UI can all call it.

The memory model (bytes on the compute device at the peak of a sampling step)
------------------------------------------------------------------------------
With D the model width, L = latent_frames x (height/16) x (width/16) video
tokens, B the batch of one model call (2 for batched CFG, 1 otherwise) and
a the activation size (2 bytes for bf16/fp16, 4 for fp32), let U = B*L*D*a
(one copy of the hidden states).

* **weights**: non-block weights (always on the device, in the compute dtype)
  + ``resident`` blocks + one device slot per streamed block, at most two
  (double buffering); with fp8 storage a block's Linear weights take 1 byte per
  weight plus an fp32 scale per output row, its norms and tables ``a`` bytes.
* **activations**: ``9.5 U`` (``8.5 U`` in fp32) + the RoPE tables (2*L*128*a) +
  four copies of the text context (B*S*D*a, S = 77 + 320 tokens).  The peak of a
  block is the k RMSNorm: the block input and the modulated ``h`` (2 U), the fused
  q|k|v (3 U), the rotated q (1 U) and the fp32 copy of k with its squares (4 U in
  bf16 terms); the FFN point is lower (2 + 4 U, GELU in place).  These constants
  were measured by counting live tensors while the real block code runs
  (``tests/core/offload/livebytes.py``; ``test_planner.py`` re-measures them: 9.25 U
  and 8.23 U at the time of writing, after the block code stopped keeping the
  patch-embedded input and the fused q|k|v alive beside later buffers).
* **attention**: fused kernels (SDPA flash/memory-efficient, flash_attn) need
  no L x L buffer, so the backend only adds temporaries at the attention call,
  where 4.5 U are alive (x, h, q, k, v): SageAttention's int8/fp8 copies of q, k,
  v (+1.5 U) stay below the block's peak.  The unfused SDPA "math" kernel is
  never used by torch on CUDA for these inputs and is not modelled.
* **fp8 matmul**: with fp8 weights the FFN's second Linear quantises its 4D-wide
  input to fp8 (2 U) next to the GELU output, which lifts that point to about
  10.25 U (measured); fp8 plans count ``PEAK_UNITS + 1 U``.
* **workspace**: fp8 weights add two dequantised copies of the largest Linear
  weight (the dequantise path; the fp8-matmul path needs less: an fp8 copy of
  the input and 128 MB of fp32 chunks), counted in full to cover both.
* **reserve**: 1 GiB + 5% of the estimate, for the CUDA caching allocator's
  fragmentation, cuBLAS workspaces and the latents/outputs of the sampler.
* **image condition** (Step-Video-TI2V only, config ``use_additional_conditions``):
  the patch embed takes ``2 x in_channels`` (its weight doubles) and the motion
  score has its own embedder (256·D + D·D weights + biases); the sampler keeps the
  first-frame condition for the call batch, B·L·C·a bytes (C = 64 latent channels),
  for the whole run, and each call concatenates it to the latents, a 2·B·L·C·a input
  of the patch embed.  Both are counted in the item ``condition`` (the concat as if
  it were alive at the block peak, where it is already freed: a small overestimate,
  2 % of U at the release's width).  T2V plans have no such item.

* **one rank of a sequence-parallel run** (Ulysses, ``sequence_parallel`` S > 1): the
  blocks see only the rank's share of the tokens, so U becomes U_r (its largest share,
  ceil(L/S) tokens) and the block peak above holds in U_r: the all-to-all of q|k|v needs
  the block input and ``h`` (2 U_r) and two q|k|v-sized buffers (6 U_r), since the
  exchange assembles its result in its own send buffer (``parallel.context``).  After
  the last block the rank gathers every token into one buffer and concatenates the parts
  in token order (2 U in full-sequence units) beside its own slice and, for an uneven
  split, its padded copy (2 U_r), with one copy of the text context left: the peak from
  about S = 6 on.  The RoPE tables, the text context and the TI2V condition
  stay full-size.  Measured with LiveBytes on 2 and 4 gloo ranks
  (``tests/core/parallel/test_dit_parallel.py``).  A rank of a CFG-parallel pair
  computes one branch: plan it with ``cfg_batch`` 1.

``blocks_on_device="auto"`` picks the largest count whose estimate + reserve
fits ``free_bytes``; if nothing fits with batched CFG, :func:`auto_plan` also
tries running the two CFG branches one after the other (B = 1).

Every entry point takes one :class:`PlanInputs` (the run as the planner sees it)
and the memory figure it plans against.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from ..dit.config import StepVideoDiTConfig
from ..vae.config import FRAME_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR
from .schedule import copies_per_pass

GiB = 1024 ** 3
HEAD_DIM = 128
CLIP_TOKENS, LLM_TOKENS = 77, 320
ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
WEIGHT_FORMATS = ("bf16", "fp16", "fp32", "fp8_scaled")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn", "sageattention")
PEAK_UNITS = {2: 9.5, 4: 8.5}           # live activation copies at a block's peak, by activation bytes
ATTENTION_LIVE_UNITS = 4.5              # alive when attention runs
FP8_MATMUL_EXTRA_UNITS = 1.0            # fp8 copy of the FFN's wide input (see the docstring)
ATTENTION_EXTRA_UNITS = {"auto": 1.5, "sdpa": 0.0, "flash_attn": 0.0, "sageattention": 1.5}
CONTEXT_COPIES = 4
SP_GATHER_FULL_UNITS = 2.0              # a sequence-parallel rank's gather after the last block, in full-sequence
SP_GATHER_LOCAL_UNITS = 2.0             # units, plus the rank's slice and its padded copy (its own share's units)
RESERVE_FIXED = 1 * GiB
RESERVE_FRACTION = 0.05
DEFAULT_CONFIG = StepVideoDiTConfig().to_dict()  # the released 30B model, as config.json spells it


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """One sampling run as the planner sees it: plain numbers and strings, so a plan stays JSON-friendly.

    ``cfg_batch``: the batch of one model call, 2 for guidance (cfg > 1) with both branches in one call,
    1 without guidance (or one branch at a time); :func:`estimate_peak` and :func:`plan` take it as given,
    :func:`auto_plan` and :func:`host_plan` fall back from 2 to 1 (the CFG branches one after the other)
    when 2 does not fit.
    ``weight_format``: one of :data:`WEIGHT_FORMATS`; ``compute_dtype``: the activations' dtype name
    (used with fp8 weights; full-precision formats compute in their own).  ``blocks_on_device``:
    "auto" or a number of blocks (an int for :func:`estimate_peak`).  ``config``: a config.json-style
    dict of the DiT (None: the released 30B model).  ``sequence_parallel``: how many ranks share the
    video's tokens (Ulysses; 1: this process has them all); the plan is then one rank's, for its
    largest share (module docstring).
    """

    def __post_init__(self):
        if isinstance(self.sequence_parallel, bool) or not isinstance(self.sequence_parallel, int) \
                or self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be a whole number of ranks >= 1, got {self.sequence_parallel!r}")

    width: int
    height: int
    frames: int
    cfg_batch: int = 2
    weight_format: str = "bf16"
    attention: str = "sdpa"
    compute_dtype: str = "bf16"
    blocks_on_device: Union[str, int] = "auto"
    config: Optional[dict] = None
    sequence_parallel: int = 1


def planned_format(weight_format: str, compute_dtype: str) -> str:
    """The planner's weight format for a DiT whose blocks are stored as ``weight_format`` ("full" or
    "fp8_scaled") and compute in ``compute_dtype`` (a name, e.g. "bf16"): fp8 stays fp8, full-precision
    weights are planned in their compute dtype (the loader casts them to it)."""
    return "fp8_scaled" if weight_format == "fp8_scaled" else compute_dtype


def _dims(config: Optional[dict]) -> dict:
    """Model sizes the estimate needs, from a config.json-style dict (default: the released 30B model)."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    caption = cfg["caption_channels"]
    llm, clip = (caption, None) if isinstance(caption, int) else caption
    ti2v = bool(cfg.get("use_additional_conditions", False))
    cin = cfg["in_channels"] * cfg["patch_size"] ** 2
    return dict(D=cfg["num_attention_heads"] * cfg["attention_head_dim"], layers=cfg["num_layers"],
                cin=cin, patch_in=cin * (2 if ti2v else 1), ti2v=ti2v,
                cout=cfg["out_channels"] * cfg["patch_size"] ** 2, llm=llm, clip=clip,
                head_dim=cfg["attention_head_dim"], latent_channels=cfg["in_channels"])


def parameter_counts(config: Optional[dict] = None) -> dict:
    """Parameters per block (Linear weights and the rest) and outside the blocks."""
    d = _dims(config)
    D = d["D"]
    non_block = (D * d["patch_in"] + D                 # pos_embed (1x1 conv; TI2V: latents ++ condition)
                 + 256 * D + D + D * D + D             # timestep embedder
                 + 6 * D * D + 6 * D                   # adaln_single.linear
                 + d["llm"] * D + D + D * D + D        # caption_projection
                 + 2 * D                               # final scale_shift_table
                 + d["cout"] * D + d["cout"])          # proj_out
    if d["clip"]:
        non_block += d["clip"] * D + D                 # clip_projection
    if d["ti2v"]:
        non_block += 256 * D + D + D * D + D           # adaln_single.emb.motion_score_embedder
    return {"block_linear": 16 * D * D,                # wqkv 3, wo 1, wq 1, wkv 2, wo 1, ff 4 + 4
            "block_linear_rows": 13 * D,
            "block_other": 10 * D + 4 * d["head_dim"],  # 2 LayerNorms (w+b), table 6D, q/k norms
            "non_block": non_block, "largest_linear": 4 * D * D, "layers": d["layers"]}


def weight_bytes(weight_format: str, compute_dtype: str = "bf16", config: Optional[dict] = None) -> dict:
    """Bytes of one block and of the non-block weights for ``weight_format``."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight_format {weight_format!r}; expected one of {WEIGHT_FORMATS}")
    counts = parameter_counts(config)
    a = ACTIVATION_BYTES[_compute_dtype(weight_format, compute_dtype)]
    if weight_format == "fp8_scaled":
        block = counts["block_linear"] + 4 * counts["block_linear_rows"] + a * counts["block_other"]
    else:
        block = ACTIVATION_BYTES[weight_format] * (counts["block_linear"] + counts["block_other"])
    return {"block": block, "non_block": a * counts["non_block"], "layers": counts["layers"]}


def _compute_dtype(weight_format: str, compute_dtype: Optional[str]) -> str:
    """Activation dtype: the weights' own for full-precision formats, ``compute_dtype`` for fp8."""
    if weight_format == "fp8_scaled":
        compute_dtype = compute_dtype or "bf16"
        if compute_dtype not in ACTIVATION_BYTES:
            raise ValueError(f"unknown compute_dtype {compute_dtype!r}; expected one of {list(ACTIVATION_BYTES)}")
        return compute_dtype
    return weight_format


def latent_tokens(width: int, height: int, frames: int, patch_size: int = 1) -> int:
    """Video tokens L of one sample (frames/17*3 latent frames x height/16 x width/16)."""
    return ((frames // FRAME_CHUNK * LATENTS_PER_CHUNK) * (height // SPATIAL_FACTOR // patch_size)
            * (width // SPATIAL_FACTOR // patch_size))


def condition_bytes(width: int, height: int, frames: int, *, cfg_batch: int, activation_bytes: int,
                    config: Optional[dict] = None) -> int:
    """Device bytes of the TI2V image condition in a sampling step (0 for a T2V config).

    The condition the sampler holds for one call batch ([cfg_batch, F, C, h, w] in the compute
    dtype) plus the channel-concatenated patch-embed input ([cfg_batch, F, 2C, h, w]).
    """
    d = _dims(config)
    if not d["ti2v"]:
        return 0
    one = cfg_batch * latent_tokens(width, height, frames) * d["latent_channels"] * activation_bytes
    return 3 * one  # held condition (1) + latents ++ condition at the patch embed (2)


def estimate_peak(run: PlanInputs) -> dict:
    """Peak device bytes of a sampling step of ``run`` with ``run.blocks_on_device`` blocks resident (an int),
    itemised (see module docstring); all values are ints."""
    if run.attention not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {run.attention!r}; expected one of {ATTENTION_BACKENDS}")
    config, cfg_batch = run.config, run.cfg_batch
    d = _dims(config)
    sizes = weight_bytes(run.weight_format, run.compute_dtype, config)
    layers = sizes["layers"]
    resident = max(0, min(int(run.blocks_on_device), layers))
    slots = min(2, layers - resident)
    a = ACTIVATION_BYTES[_compute_dtype(run.weight_format, run.compute_dtype)]
    L = latent_tokens(run.width, run.height, run.frames)
    ranks = run.sequence_parallel
    L_rank = -(-L // ranks)                      # the largest share (token_split gives the first ranks one more)
    unit = cfg_batch * L_rank * d["D"] * a
    fp8 = run.weight_format == "fp8_scaled"
    peak_units = PEAK_UNITS[a] + (FP8_MATMUL_EXTRA_UNITS if fp8 else 0.0)
    units = max(peak_units, ATTENTION_LIVE_UNITS + ATTENTION_EXTRA_UNITS[run.attention])
    context = cfg_batch * (CLIP_TOKENS + LLM_TOKENS) * d["D"] * a     # one copy of the projected text context
    peak = units * unit + CONTEXT_COPIES * context                     # inside a block
    if ranks > 1:  # after the last block: the gather, beside the projected context only
        gather = SP_GATHER_FULL_UNITS * cfg_batch * L * d["D"] * a + SP_GATHER_LOCAL_UNITS * unit + context
        peak = max(peak, gather)
    activations = peak + 2 * L * d["head_dim"] * a                    # + the RoPE tables, alive throughout
    workspace = 2 * parameter_counts(config)["largest_linear"] * a if fp8 else 0
    items = {"non_block_weights": sizes["non_block"], "resident_blocks": resident * sizes["block"],
             "stream_slots": slots * sizes["block"], "activations": int(activations), "workspace": workspace}
    if d["ti2v"]:
        items["condition"] = condition_bytes(run.width, run.height, run.frames, cfg_batch=cfg_batch,
                                             activation_bytes=a, config=config)
    total = sum(items.values())
    return {"total": total, "items": items, "tokens": L, "tokens_per_rank": L_rank, "resident": resident,
            "slots": slots, "block_bytes": sizes["block"], "reserve": int(RESERVE_FIXED + RESERVE_FRACTION * total)}


def plan(run: PlanInputs, *, free_bytes: int) -> dict:
    """The plan for ``run`` in ``free_bytes`` of device memory: a JSON-friendly dict.

    ``run.blocks_on_device`` "auto" chooses the most blocks that fit, a number is taken as given.
    Keys: ``blocks_on_device`` (chosen, or the number given), ``num_blocks``,
    ``streamed_blocks``, ``copies_per_step`` (block copies per model call), ``fits``,
    ``peak_bytes`` (estimate, without reserve), ``reserve_bytes``, ``free_bytes``,
    ``items`` (itemised peak), ``tokens``, ``cfg_batch``, ``weight_format``, ``message``.
    """
    layers = weight_bytes(run.weight_format, run.compute_dtype, run.config)["layers"]

    def estimate(blocks: int) -> dict:
        return estimate_peak(dataclasses.replace(run, blocks_on_device=blocks))

    if run.blocks_on_device == "auto":
        chosen = next((n for n in range(layers, -1, -1) if _fits(estimate(n), free_bytes)), 0)
    else:
        chosen = max(0, min(int(run.blocks_on_device), layers))
    est = estimate(chosen)
    fits = _fits(est, free_bytes)
    streamed = layers - chosen
    gb = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    if not fits:
        message = (f"does not fit: {gb(est['total'])} + {gb(est['reserve'])} reserve needed with "
                   f"{chosen} of {layers} blocks on the device, {gb(free_bytes)} free")
    elif streamed == 0:
        message = f"all {layers} blocks on the device: {gb(est['total'])} of {gb(free_bytes)}"
    else:
        message = (f"{chosen} of {layers} blocks on the device, {streamed} streamed: "
                   f"{gb(est['total'])} of {gb(free_bytes)}")
    message += _share_note(run, est)
    return {"blocks_on_device": chosen, "num_blocks": layers, "streamed_blocks": streamed,
            "copies_per_step": copies_per_pass(layers, chosen), "fits": fits, "peak_bytes": est["total"],
            "reserve_bytes": est["reserve"], "free_bytes": int(free_bytes), "items": est["items"],
            "tokens": est["tokens"], "tokens_per_rank": est["tokens_per_rank"],
            "sequence_parallel": run.sequence_parallel, "cfg_batch": run.cfg_batch,
            "weight_format": run.weight_format, "attention": run.attention, "message": message}


def _share_note(run: PlanInputs, estimate: dict) -> str:
    """What a plan message adds for one rank of a sequence-parallel run ("" for one process)."""
    if run.sequence_parallel == 1:
        return ""
    return (f" (per rank: {run.sequence_parallel} ranks share the {estimate['tokens']} tokens, "
            f"at most {estimate['tokens_per_rank']} each)")


def _fits(estimate: dict, free_bytes: int) -> bool:
    """True when an :func:`estimate_peak` result and its reserve fit in ``free_bytes``."""
    return estimate["total"] + estimate["reserve"] <= free_bytes


def auto_plan(run: PlanInputs, *, free_bytes: int) -> dict:
    """:func:`plan` with batched CFG when it fits, else with the two CFG branches run one by one.

    Batched CFG is preferred: it is the official computation and streams each block
    once per step instead of twice.  Adds ``batch_cfg`` (bool) to the plan.  Without
    guidance (``run.cfg_batch`` 1) the batch is 1 anyway.
    """
    if run.cfg_batch == 1:
        return dict(plan(run, free_bytes=free_bytes), batch_cfg=False)
    batched = plan(run, free_bytes=free_bytes)
    if batched["fits"]:
        return dict(batched, batch_cfg=True)
    one_by_one = plan(dataclasses.replace(run, cfg_batch=1), free_bytes=free_bytes)
    one_by_one["message"] += " (CFG branches one after the other)"
    return dict(one_by_one, batch_cfg=False)


# --------------------------------------------------------------------------- host RAM (computing on the CPU)

# Refuse a CPU run whose estimate exceeds the available RAM by more than this factor: past it the run
# cannot finish and would bring in the out-of-memory killer (on a ComfyUI server: the whole server).
# Between 1 and this factor the estimate's own error decides, so the run is tried with a warning.
HOST_REFUSE_FACTOR = 1.2


def human_bytes(nbytes: int) -> str:
    """Bytes as "21.6 GiB" or, below a GiB, "14.7 MiB" (the unit every plan message uses)."""
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / (1 << 20):.1f} MiB"


def host_activation_bytes(run: PlanInputs) -> int:
    """Host RAM a CPU sampling step of ``run`` needs beyond the weights (already loaded): activations +
    workspace (+ the image condition of a TI2V config)."""
    items = estimate_peak(dataclasses.replace(run, blocks_on_device=0))["items"]
    return items["activations"] + items["workspace"] + items.get("condition", 0)


def host_plan(run: PlanInputs, *, available_bytes: Optional[int]) -> dict:
    """The plan for sampling ``run`` on the CPU, where every block is in RAM: a JSON-friendly dict.

    Keys as :func:`auto_plan` (``blocks_on_device`` = all, ``fits``, ``peak_bytes`` = RAM needed beyond
    the loaded weights, ``batch_cfg``, ``message``...) plus ``available_bytes`` and ``refuse`` (True when
    the estimate exceeds ``available_bytes`` by more than :data:`HOST_REFUSE_FACTOR`) and, when it does
    not fit, ``would_fit``: the most frames at this size and the largest size at these frames (same
    aspect ratio) that do.  ``available_bytes`` None (unknown) never refuses.  ``run.blocks_on_device``
    is not used (every block is in RAM), nor ``run.sequence_parallel``: ranks on one machine share its
    RAM, so the whole sequence's activations are planned (about what the ranks' shares add up to).
    """
    run = dataclasses.replace(run, sequence_parallel=1)
    width, height, frames = run.width, run.height, run.frames
    layers = weight_bytes(run.weight_format, run.compute_dtype, run.config)["layers"]

    def need(w: int, h: int, f: int, batch: int) -> int:
        return host_activation_bytes(dataclasses.replace(run, width=w, height=h, frames=f, cfg_batch=batch))

    peak, batch_cfg, fell_back = need(width, height, frames, run.cfg_batch), run.cfg_batch == 2, False
    if batch_cfg and available_bytes is not None and peak > available_bytes:  # as auto_plan: one branch at a time
        peak, batch_cfg, fell_back = need(width, height, frames, 1), False, True
    limit = available_bytes if available_bytes is not None else 1 << 62
    fits = peak <= limit
    refuse = available_bytes is not None and peak > HOST_REFUSE_FACTOR * available_bytes
    gb = human_bytes
    cfg_note = " (CFG branches one after the other)" if fell_back else ""
    plan_dict = {"blocks_on_device": layers, "num_blocks": layers, "streamed_blocks": 0, "copies_per_step": 0,
                 "fits": fits, "refuse": refuse, "peak_bytes": peak, "reserve_bytes": 0,
                 "free_bytes": available_bytes, "available_bytes": available_bytes, "batch_cfg": batch_cfg,
                 "tokens": latent_tokens(width, height, frames), "weight_format": run.weight_format,
                 "attention": run.attention}
    if available_bytes is None:
        plan_dict["message"] = f"all {layers} blocks in RAM; the run needs about {gb(peak)} beyond the weights"
        return plan_dict
    if fits:
        plan_dict["message"] = (f"all {layers} blocks in RAM; the run needs about {gb(peak)} beyond the weights, "
                                f"{gb(available_bytes)} available{cfg_note}")
        return plan_dict
    chunk, cell = FRAME_CHUNK, SPATIAL_FACTOR
    most_frames = next((f for f in range(frames - chunk, chunk - 1, -chunk) if need(width, height, f, 1) <= limit),
                       None)
    largest = None
    for step in range(max(width, height) // cell - 1, 0, -1):  # the longer side in 16 px steps, same aspect ratio
        scale = step * cell / max(width, height)
        w, h = max(cell, round(width * scale / cell) * cell), max(cell, round(height * scale / cell) * cell)
        if need(w, h, frames, 1) <= limit:
            largest = (w, h)
            break
    options = []
    if most_frames:
        options.append(f"{width}x{height} with at most {most_frames} frames")
    if largest:
        options.append(f"{largest[0]}x{largest[1]} with {frames} frames")
    plan_dict["would_fit"] = {"frames": most_frames, "size": list(largest) if largest else None}
    plan_dict["message"] = (f"does not fit in RAM: the run needs about {gb(peak)} beyond the weights"
                            f"{cfg_note}, {gb(available_bytes)} available; "
                            + ("what fits: " + " or ".join(options) if options
                               else f"not even {cell}x{cell}x{chunk} fits"))
    return plan_dict
