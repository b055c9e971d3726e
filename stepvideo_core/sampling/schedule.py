"""Flow-matching schedule, Euler step and presets of Step-Video-T2V (and -Turbo, -TI2V).

Convention (the official ``FlowMatchDiscreteScheduler`` with its default
``reverse=False``): sigma runs from 0 (pure noise) to 1 (data).  The model is
called at ``sigmas[i]`` for i < steps and predicts the velocity dx/dsigma; one
Euler step moves the latents from ``sigmas[i]`` to ``sigmas[i + 1]``.

Every function here reproduces the official arithmetic operation for operation
(same dtypes, same order), so the schedule is bit-identical to the official one
(checked against ``tests/fixtures/stepvideo_scheduler.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import finite_float


@dataclass(frozen=True)
class Preset:
    """Recommended sampling settings of one released model (official README, "best practice").

    ``frames`` is the model's default video length; ``motion_score`` is None for the text-to-video
    models and the default motion score of the image-to-video one (``image`` True: it needs a
    first-frame image and a Step-Video-TI2V transformer).
    """

    name: str
    steps: int
    cfg: float
    shift: float
    description: str
    frames: int = 204
    motion_score: Optional[float] = None
    image: bool = False


TI2V_PRESET = "Step-Video-TI2V"
PRESETS = {
    "Step-Video-T2V": Preset("Step-Video-T2V", 50, 9.0, 13.0, "the base model: 30-50 steps, cfg 9, shift 13"),
    "Step-Video-T2V-Turbo": Preset("Step-Video-T2V-Turbo", 15, 5.0, 17.0,
                                   "the step-distilled Turbo model: 10-15 steps, cfg 5, shift 17"),
    # official README command: 102 frames, 50 steps, cfg 9, time_shift 13, motion_score 5 (2 steadier, 10-20 more)
    TI2V_PRESET: Preset(TI2V_PRESET, 50, 9.0, 13.0,
                        "the image-to-video model: 102 frames, 50 steps, cfg 9, shift 13, motion score 5 "
                        "(2 steadier, 10-20 more motion)", frames=102, motion_score=5.0, image=True),
}
DEFAULT_PRESET = "Step-Video-T2V"
DEFAULT_MOTION_SCORE = PRESETS[TI2V_PRESET].motion_score


def preset_for(ti2v: bool) -> str:
    """The preset a transformer samples with by default: Step-Video-TI2V for a TI2V model, else the T2V one."""
    return TI2V_PRESET if ti2v else DEFAULT_PRESET


def resolve_motion_score(preset: str = TI2V_PRESET, motion_score: Optional[float] = None) -> float:
    """The motion score of a TI2V run: ``motion_score`` when given, else the preset's (5 for Step-Video-TI2V).

    Exists so that the CLI, the pipeline and the sampler default the same way; a preset without a
    motion score (the T2V ones) falls back to :data:`DEFAULT_MOTION_SCORE`.  Raises ValueError for
    an unknown preset or a NaN/Inf score.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    if motion_score is None:
        motion_score = PRESETS[preset].motion_score
        return DEFAULT_MOTION_SCORE if motion_score is None else motion_score
    return finite_float(motion_score, "motion_score")


def resolve_settings(preset: str = DEFAULT_PRESET, steps: Optional[int] = None, cfg: Optional[float] = None,
                     shift: Optional[float] = None) -> dict:
    """Return ``{"steps", "cfg", "shift"}``: the preset's values, each replaced by the caller's when given.

    Exists so that the node, the CLI and scripts share one notion of "preset with overrides".
    Raises ValueError for an unknown preset, a NaN/Inf cfg or shift (which would pass every
    range check and sample a black video) or out-of-range values.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    base = PRESETS[preset]
    out = {"steps": base.steps if steps is None else int(steps),
           "cfg": base.cfg if cfg is None else finite_float(cfg, "cfg"),
           "shift": base.shift if shift is None else finite_float(shift, "shift")}
    if out["steps"] < 1:
        raise ValueError(f"steps must be at least 1, got {out['steps']}")
    if out["shift"] <= 0:
        raise ValueError(f"shift must be positive, got {out['shift']}")
    if out["cfg"] < 0:
        raise ValueError(f"cfg must not be negative, got {out['cfg']}")
    return out


def time_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3-style shift ``shift*s / (1 + (shift-1)*s)``, evaluated in the official order."""
    return (shift * s) / (1 + (shift - 1) * s)


def flow_match_sigmas(steps: int, shift: float, device=None) -> torch.Tensor:
    """The official ``sigmas``: fp32 tensor [steps + 1] rising from 0.0 (noise) to 1.0 (data).

    ``sigma_k = 1 - shift*s_k / (1 + (shift-1)*s_k)`` with ``s = linspace(1, 0, steps+1)``.
    The model is evaluated at ``sigmas[:-1]`` (the official ``timesteps``).
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    s = torch.linspace(1, 0, int(steps) + 1, dtype=torch.float32, device=device)
    return 1 - time_shift(s, float(shift))


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index: int) -> torch.Tensor:
    """Latents moved from ``sigmas[index]`` to ``sigmas[index + 1]``, in fp32.

    As the official scheduler: ``sample.float() + velocity.float() * (sigmas[i+1] - sigmas[i])``
    (the step is a 0-dim fp32 tensor, so the product is rounded exactly as there).
    """
    dt = sigmas[index + 1] - sigmas[index]
    return sample.to(torch.float32) + velocity.to(torch.float32) * dt.to(velocity.device)


def guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + g*(v_c - v_u)``, in the velocities' own dtype.

    The official pipeline combines the transformer outputs as they come (bf16 at
    inference) and only then casts to fp32 inside the Euler step; doing the same
    keeps the sampler faithful to the last bit.
    """
    return uncond + scale * (cond - uncond)
