"""One sampling run of a loaded DiT, as the sampler node and the headless pipeline both make it.

:func:`plan_and_sample` is the one orchestration: plan the block placement, refuse or warn about a run
that cannot or may not fit (:func:`check_plan`), attach the LoRA adapters, compile the blocks, then
:func:`~stepvideo_core.sampling.sample` with the plan's placement.  What differs between the callers
comes in as arguments: the free-memory figure (``make_room``: ComfyUI frees other models first), a hook
between planning and sampling (``on_plan``: ComfyUI accounts for the weights kept on the GPU), and the
sampler itself (``sampler``: the node's multi-GPU runner stands in for ``sample``).  Nothing here
imports ComfyUI.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Union

import torch

from ..compile import CompiledBlocks, CompileSettings, compiled_blocks
from ..dtypes import DTYPE_NAMES
from ..offload.planner import PlanInputs, auto_plan, host_plan, planned_format
from ..memory import available_host_bytes, cuda_free_vram
from .sampler import sample
from .settings import Placement, SamplingSettings

if TYPE_CHECKING:
    from ..parallel.layout import ParallelLayout

log = logging.getLogger("StepVideo")

BLOCK_CHOICES_HELP = "'auto' (the memory planner decides), 'all', or a number of blocks"
# given the bytes the fully resident run needs on the device: make room, return the free bytes then (None: unknown)
MakeRoom = Callable[[int], Optional[int]]


def check_blocks_choice(choice: Union[str, int]) -> str:
    """``choice`` as a string ("auto", "all" or digits); ValueError for anything else, naming what is allowed."""
    text = str(choice)
    if text not in ("auto", "all") and not text.isdigit():
        raise ValueError(f"blocks_on_device must be {BLOCK_CHOICES_HELP}, got {choice!r}")
    return text


@dataclasses.dataclass(frozen=True)
class DiTSetup:
    """How a loaded DiT runs: what its weights are and the user's choices, the same for each of its runs.

    ``compute_dtype``: the DiT's compute dtype; ``weight_format``: how its block weights are stored
    ("full" in ``compute_dtype``, or "fp8_scaled"); ``attention``: the backend set on the model for the
    run; ``blocks_on_device``: "auto" (the memory planner decides), "all", or a number of blocks kept on
    the device (checked here); ``adapters``: LoRA entries attached for the run; ``compile``: the
    :func:`~stepvideo_core.compile.compiled_blocks` choice ("off", "blocks" or CompileSettings).
    """

    compute_dtype: torch.dtype
    weight_format: str = "full"
    attention: str = "sdpa"
    blocks_on_device: Union[str, int] = "auto"
    adapters: tuple = ()
    compile: Union[None, str, CompileSettings] = "off"

    def __post_init__(self):
        object.__setattr__(self, "blocks_on_device", check_blocks_choice(self.blocks_on_device))

    def plan_inputs(self, config, settings: SamplingSettings, layout: Optional[ParallelLayout] = None) -> PlanInputs:
        """The planner's view of a run of ``settings`` with this DiT (``config``: its StepVideoDiTConfig).

        Exists because the planner speaks names, not torch dtypes: full-precision weights are planned as
        their compute dtype, "auto"/"all"/a number stays as chosen for :func:`plan_blocks` to resolve.
        ``layout``: the parallel run this process is one rank of (None: one process); its plan is the
        rank's: its share of the tokens, one guidance branch per call on a CFG-parallel rank.
        """
        name = DTYPE_NAMES[self.compute_dtype]
        blocks = self.blocks_on_device
        batch = 2 if settings.guided else 1
        sequence_parallel = 1
        if layout is not None:
            batch, sequence_parallel = max(1, batch // layout.cfg), layout.sp
        return PlanInputs(settings.width, settings.height, settings.frames, cfg_batch=batch,
                          weight_format=planned_format(self.weight_format, name),
                          attention=self.attention, compute_dtype=name, config=config.to_dict(),
                          blocks_on_device=int(blocks) if blocks.isdigit() else blocks,
                          sequence_parallel=sequence_parallel)


def plan_blocks(config, setup: DiTSetup, settings: SamplingSettings, *, device: torch.device,
                free_bytes: Optional[int] = None, layout: Optional[ParallelLayout] = None) -> dict:
    """How a run places the DiT's blocks: the planner's dict (``blocks_on_device``, ``batch_cfg``, ``message``...).

    On the CPU every block stays in RAM and the plan says whether the activations fit the available
    RAM (``free_bytes``, default: what the system has free; :func:`~stepvideo_core.offload.planner.host_plan`);
    on a GPU "all" keeps every block there, else the planner fits ``setup.blocks_on_device`` ("auto" or
    a number) into ``free_bytes`` (default: the device's free memory).  Pass the plan to
    :func:`check_plan` before allocating.
    """
    inputs = setup.plan_inputs(config, settings, layout)
    if device.type == "cpu":
        return host_plan(inputs, available_bytes=available_host_bytes() if free_bytes is None else free_bytes)
    if inputs.blocks_on_device == "all":
        layers = config.num_layers
        return {"blocks_on_device": layers, "batch_cfg": True, "fits": True, "streamed_blocks": 0,
                "message": f"all {layers} blocks on {device}"}
    if free_bytes is None:
        free_bytes = cuda_free_vram(device)
    return auto_plan(inputs, free_bytes=1 << 62 if free_bytes is None else free_bytes)


def plan_run(config, setup: DiTSetup, settings: SamplingSettings, *, device: torch.device,
             make_room: Optional[MakeRoom] = None, layout: Optional[ParallelLayout] = None) -> dict:
    """:func:`plan_blocks` against the memory ``make_room`` reports, after it made room; returns the plan.

    On a GPU, ``make_room`` (when given) is called first with the bytes the fully resident run needs
    (peak + reserve), also for "all" (another model may still hold the device), and returns the free
    bytes to plan with (None: unknown, the plan then assumes enough).  Without it, or on the CPU, the
    plan reads the free memory itself.  ``layout``: as :meth:`DiTSetup.plan_inputs` (a rank's plan).
    """
    if make_room is None or device.type == "cpu":
        return plan_blocks(config, setup, settings, device=device, layout=layout)
    resident = dataclasses.replace(setup, blocks_on_device=config.num_layers)
    wanted = plan_blocks(config, resident, settings, device=device, free_bytes=1 << 62, layout=layout)
    free = make_room(wanted["peak_bytes"] + wanted["reserve_bytes"])
    return plan_blocks(config, setup, settings, device=device, free_bytes=1 << 62 if free is None else free,
                       layout=layout)


class MemoryPlanError(ValueError):
    """The memory plan says a run cannot fit (host RAM on a CPU); raised before anything is allocated."""


def check_plan(plan: dict) -> None:
    """Refuse a run the plan marks impossible (``refuse``), warn about one that may not fit; else nothing.

    One rule for the sampler node and the headless pipeline: a CPU run far beyond the available
    RAM would bring in the out-of-memory killer (in ComfyUI: the whole server), so it is refused
    with the plan's numbers and what would fit; a GPU run that may not fit is tried (CUDA reports
    an out-of-memory error the caller can survive).
    """
    if plan.get("refuse"):
        raise MemoryPlanError(f"refused before allocating: {plan['message']}. Lower the frames or the size, "
                              f"compute in bf16 (half the activations), or use a GPU.")
    if not plan["fits"]:
        log.warning("the memory plan says this run may not fit (%s); trying anyway. fp8_scaled weights, "
                    "fewer frames or a smaller size need less memory.", plan["message"])


@dataclasses.dataclass
class PlannedSample:
    """What :func:`plan_and_sample` returns: the latents, the plan they were made with, the compile state."""

    latents: torch.Tensor
    plan: dict
    compiled: CompiledBlocks


def plan_and_sample(model: torch.nn.Module, positive: Mapping, negative: Optional[Mapping],
                    settings: SamplingSettings, *, setup: DiTSetup, placement: Placement,
                    make_room: Optional[MakeRoom] = None,
                    on_plan: Optional[Callable[[dict, Placement], None]] = None,
                    sampler: Callable[..., torch.Tensor] = sample, layout: Optional[ParallelLayout] = None,
                    **sample_kwargs) -> PlannedSample:
    """Plan, check, attach adapters, compile and sample one run of ``model``; see :class:`PlannedSample`.

    * ``setup``: the DiT's weights and choices (:class:`DiTSetup`); ``placement``: where it computes
      (``placement.device``; its ``blocks_on_device`` and ``batch_cfg`` are replaced by the plan's).
    * ``make_room``: the free-memory figure of a GPU run (see :func:`plan_run`; None: the device's own).
    * ``on_plan(plan, placement)``: called once the plan is checked, with the placement the run will use,
      before anything is attached or sampled.
    * ``sampler``: called as :func:`~stepvideo_core.sampling.sample` (default), with the rest of its
      keyword arguments from ``sample_kwargs`` (``condition``, ``on_step``, ``should_stop``, ``cache``,
      ``stats``, ``noise``).
    * ``layout``: the parallel layout the run is split by, planned per rank (default: that of
      ``placement.parallel``; a ``sampler`` that runs the ranks itself passes its own).

    The negative conditioning is passed only to a guided run.  CFG batching follows the plan, except
    on a CFG-parallel run, whose two ranks each compute one half of the batched call.  Adapters are
    attached outside the compiled blocks, which are outside the block streamer.
    """
    device = torch.device(placement.device) if placement.device is not None else next(model.parameters()).device
    if layout is None and placement.parallel is not None:
        layout = placement.parallel.layout
    plan = plan_run(model.config, setup, settings, device=device, make_room=make_room, layout=layout)
    check_plan(plan)
    log.info("block plan: %s", plan["message"])
    blocks = plan["blocks_on_device"]
    cfg_parallel = placement.parallel is not None and placement.parallel.layout.cfg > 1
    placement = dataclasses.replace(placement, device=device,
                                    blocks_on_device=blocks if blocks < model.config.num_layers else None,
                                    batch_cfg=plan["batch_cfg"] or cfg_parallel)
    if on_plan is not None:
        on_plan(plan, placement)
    model.attention_backend = setup.attention
    adapters = nullcontext()
    if setup.adapters:  # exact base weights back afterwards (looked up per run, as the node and the jobs do)
        from ..lora.apply import attached
        adapters = attached(model, setup.adapters, blocks_on_device=blocks)
    compiled = compiled_blocks(model, setup.compile, device=device)
    with adapters, compiled:
        latents = sampler(model, positive, negative if settings.guided else None, settings=settings,
                          placement=placement, **sample_kwargs)
    return PlannedSample(latents=latents, plan=plan, compiled=compiled)
