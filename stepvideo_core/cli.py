"""Command line: ``python -m stepvideo_core <command>``.

``generate``  prompt -> .mp4, headless: the same pipeline the nodes run
              (:mod:`stepvideo_core.pipeline`).  ``--models DIR`` is the official
              stepvideo-t2v release folder; without it a tiny random model in the
              official layout is used (cached, see ``--tiny-cache``): a smoke test of
              the install whose output is noise, not a real video.  ``--cache
              adaptive|calibrated`` skips DiT calls whose output barely changes.
              ``--image first.png`` makes it image-to-video: the transformer must
              then be Step-Video-TI2V (``--transformer stepvideo-ti2v/transformer``;
              the tiny default has one), and the defaults follow the TI2V preset
              (102 frames, motion score 5, ``--motion-score``).
``calibrate-cache``  one uncached sampling run that measures the step cache's
              calibration for your own weights (magnitude ratios of successive
              velocities) and writes it to a JSON file; the pack ships none it has
              not measured.
``check``     loads a DiT through the real loader and runs one forward pass.  With
              no ``--transformer`` it first writes a tiny random DiT in the official
              folder layout to a temporary folder: a smoke test of the install,
              not a real model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TextIO

import torch

from .checks import finite_float
from .dtypes import DTYPES

if TYPE_CHECKING:
    from .pipeline import ModelFiles, VideoRequest

COMPILE_MODES = ("off", "blocks")  # = stepvideo_core.compile.MODES
# The tiny default renders this unless told otherwise: a few seconds on two CPU cores.
TINY_DEFAULTS = dict(width=64, height=64, frames=17, steps=3)
# The official size (544x992, 204 frames = 8 s at 25 fps).
REAL_DEFAULTS = dict(width=992, height=544, frames=204, steps=None)  # frames: the preset's (102 for TI2V)
LORA_SPEC = "FILE[:STRENGTH]"
CALIBRATION_PROMPT = "A red fox runs across a snowy meadow at sunrise, the camera follows it, cinematic lighting"
SMOKE_TEST_NOTE = ("SMOKE TEST: no --models given, so this used the embedded tiny model (random weights in the "
                   "official layout). The file shows that the install works; it is noise, not a real video.")


class TextProgress:
    """A one-line progress bar on a terminal stream (tqdm is not a dependency).

    Called as ``bar(done, total)``.  On a terminal the line is redrawn in place
    (``label [#####-----] 3/10 1.2 s``); into a file or pipe it writes a line at
    each tenth of the way and at the end, so logs stay short.
    """

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None, width: int = 24):
        self.label, self.total, self.width = label, max(int(total), 1), width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_tenth = -1

    def __call__(self, done: int, total: Optional[int] = None) -> None:
        total = max(int(total or self.total), 1)
        done = min(int(done), total)
        filled = self.width * done // total
        line = (f"{self.label:<14} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total} "
                f"{time.perf_counter() - self.start:.1f} s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
        elif done == total or 10 * done // total != self._last_tenth:
            self._last_tenth = 10 * done // total
            self.stream.write(line + "\n")
        self.stream.flush()


def progress_factory(stream: Optional[TextIO] = None):
    """The pipeline's ``progress(phase, total)`` hook: a new :class:`TextProgress` per phase."""
    return lambda phase, total: TextProgress(phase, total, stream)


def smoke_inputs(model, frames: int = 3, height: int = 4, width: int = 6, text_tokens: int = 12,
                 seed: int = 0) -> dict:
    """Random DiT inputs sized for ``model``'s config (CFG-sized batch of 2, realistic mask; with the image
    condition and a motion score of 5 for a TI2V model)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    clip_tokens = 77 if cfg.clip_dim else 0
    mask = torch.zeros(2, clip_tokens + text_tokens)
    mask[0, :clip_tokens + text_tokens] = 1
    mask[1, :clip_tokens + text_tokens // 2] = 1
    inputs = dict(hidden_states=torch.randn(2, frames, cfg.in_channels, height, width, generator=gen),
                  timestep=torch.tensor([0.0, 0.5]),
                  encoder_hidden_states=torch.randn(2, text_tokens, cfg.caption_dim, generator=gen),
                  encoder_attention_mask=mask)
    if cfg.clip_dim:
        inputs["encoder_hidden_states_2"] = torch.randn(2, clip_tokens, cfg.clip_dim, generator=gen)
    if cfg.is_ti2v:  # image-to-video: a first latent frame, then zeros (as image_condition builds it), score 5
        condition = torch.zeros(2, frames, cfg.in_channels, height, width)
        condition[:, :1] = torch.randn(2, 1, cfg.in_channels, height, width, generator=gen)
        inputs.update(condition_hidden_states=condition, motion_score=5.0)
    return inputs


def check(transformer: Optional[str], dtype: torch.dtype, device: str, attention: str) -> int:
    """Load + one forward; prints what happened. Returns a process exit code."""
    from . import load_transformer
    from .tiny import write_tiny_dit

    with tempfile.TemporaryDirectory(prefix="stepvideo-check-") as tmp:
        if transformer is None:
            print("No --transformer given: writing a tiny random DiT in the official folder layout "
                  "(a smoke test of the install, not real weights).")
            transformer = str(write_tiny_dit(Path(tmp) / "stepvideo-t2v"))
            files = sorted(p.name for p in (Path(transformer) / "transformer").iterdir())
            print(f"  wrote {transformer}/transformer: {', '.join(files)}")
        start = time.perf_counter()
        model = load_transformer(transformer, dtype=dtype, device=device, attention=attention)
        cfg = model.config
        print(f"  loaded {len(model.state_dict())} tensors ({cfg.variant}, {cfg.num_layers} blocks, "
              f"width {cfg.inner_dim}, "
              f"{model.num_parameters() / 1e6:.1f} M parameters) as {dtype} on {device} "
              f"in {time.perf_counter() - start:.2f} s")
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in smoke_inputs(model).items()}
        start = time.perf_counter()
        with torch.no_grad():
            velocity = model(**inputs)
        finite = bool(torch.isfinite(velocity).all())
        print(f"  forward {list(inputs['hidden_states'].shape)} -> velocity {list(velocity.shape)} "
              f"({'finite' if finite else 'NOT FINITE'}) in {time.perf_counter() - start:.2f} s")
    print("OK" if finite else "FAILED: non-finite output")
    return 0 if finite else 1


def model_files(args) -> "ModelFiles":
    """The files to use: ``--models`` with overrides, or the cached tiny release (first run writes it).

    With ``--image`` and no model files given, the tiny release's Step-Video-TI2V transformer is
    used (``transformer-ti2v/``), so image-to-video runs with no download too.
    """
    from .pipeline import ModelFiles
    from .tiny import cached_tiny_release, tiny_ti2v_transformer

    if args.models is None and args.transformer is None and args.vae is None and args.text_encoders is None:
        start = time.perf_counter()
        root, created = cached_tiny_release(getattr(args, "tiny_cache", None))
        image = getattr(args, "image", None) is not None
        print(f"No --models given: using the embedded tiny default{' image-to-video (TI2V)' if image else ''} "
              f"(random weights in the official layout), {'written to' if created else 'cached in'} {root.parent}"
              f"{f' in {time.perf_counter() - start:.1f} s' if created else ''}.")
        print("  The output is a smoke test of the install, not a real video.")
        return ModelFiles.from_release(root, transformer=tiny_ti2v_transformer(root) if image else None, tiny=True)
    return ModelFiles.from_release(args.models, transformer=args.transformer, vae=args.vae,
                                   text_encoders=args.text_encoders)


def generate(args) -> int:
    """``generate``: prompt -> mp4 through :class:`~stepvideo_core.pipeline.StepVideoPipeline`; returns an exit code."""
    from .pipeline import OFFICIAL_NEGATIVE
    from .video_io import DEFAULT_FPS, crop_to_540p, read_video_info, write_mp4

    total_start = time.perf_counter()
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun rank other than 0: quiet (warnings and errors show)
        sys.stdout = open(os.devnull, "w")
        logging.getLogger("StepVideo").setLevel(logging.WARNING)
    cache = step_cache_from_args(args)  # before model_files: a legacy --cache DIR becomes --tiny-cache
    files = model_files(args)
    from .parallel import run as parallel_run
    from .sampling import resolve_settings

    device = str(parallel_run.rank_device(args.device)) if parallel_run.world_size() > 1 else args.device
    pipe = make_pipeline(args, files, device=device)
    ti2v = pipe.check_mode(args.image)  # from the file headers: an image for T2V (or none for TI2V) stops here
    preset, size = run_choices(args, files, ti2v)
    pipe.parallel = parallel_run.join(args.parallel, pipe.transformer_config().num_attention_heads,
                                      guided=resolve_settings(preset, None, args.cfg, None)["cfg"] > 1.0,
                                      device=device)
    first = pipe.parallel is None or pipe.parallel.is_first  # rank 0 reports and writes the file
    source = f" from the image {args.image}" if ti2v else ""
    where = f" ({pipe.parallel.layout.describe()})" if pipe.parallel is not None else ""
    print(f"Generating {size['width']}x{size['height']}, {size['frames']} frames{source} on {pipe.device}{where} "
          f"({str(pipe.dtype).replace('torch.', '')}) -> {args.out}")
    result = pipe.generate(args.prompt, OFFICIAL_NEGATIVE if args.negative is None else args.negative,
                           video_request(args, preset, size), image=args.image, add_magic=not args.no_magic,
                           progress=progress_factory() if first else None, cache=cache)
    if not first:
        return 0
    frames = crop_to_540p(result.frames) if args.crop_540p else result.frames
    start = time.perf_counter()
    out = write_mp4(args.out, frames, fps=args.fps or DEFAULT_FPS, crf=args.crf)
    result.seconds["write"] = time.perf_counter() - start
    info = read_video_info(out)
    run = result.settings
    print(f"Wrote {out}: {info['frames']} frames, {info['width']}x{info['height']}, {info['fps']:g} fps, "
          f"{info['codec']} {info['pix_fmt']} ({info['frames'] / info['fps']:.2f} s of video)")
    motion = f", motion score {run['motion_score']:g}" if "motion_score" in run else ""
    print(f"  {run['preset']}: {run['steps']} steps, cfg {run['cfg']:g}, shift {run['shift']:g}{motion}, "
          f"seed {run['seed']}; {result.plan['message']}")
    if result.cache:
        print("  " + cache_summary(result.cache))
    if "compile" in run:
        print("  " + run["compile"])
    print("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
          + f"; total {time.perf_counter() - total_start:.1f} s")
    if files.tiny:
        print(SMOKE_TEST_NOTE)
    return 0


def make_pipeline(args, files: "ModelFiles", device: Optional[str] = None):
    """The :class:`~stepvideo_core.pipeline.StepVideoPipeline` of ``generate``'s (and ``calibrate-cache``'s) options
    (``device`` overrides ``--device``: a torchrun rank's own GPU)."""
    from .pipeline import StepVideoPipeline

    device = device if device is not None else args.device
    device = torch.device(device) if device else None
    return StepVideoPipeline(files, device=device, dtype=None if args.dtype == "default" else DTYPES[args.dtype],
                             weight_format=args.weights, attention=args.attention,
                             blocks_on_device=args.blocks_on_device, text_plan=args.text_plan,
                             loras=args.lora, compile=getattr(args, "compile", "off"))


def run_choices(args, files: "ModelFiles", ti2v: bool) -> tuple:
    """(preset, {width, height, frames, steps}) of the options, with the defaults of the model in use."""
    from .pipeline import resolve_preset
    from .sampling import PRESETS, preset_for

    preset = resolve_preset(args.preset) if args.preset is not None else preset_for(ti2v)
    defaults = TINY_DEFAULTS if files.tiny else dict(REAL_DEFAULTS, frames=PRESETS[preset].frames)
    return preset, {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


def video_request(args, preset: str, size: dict) -> "VideoRequest":
    """The :class:`~stepvideo_core.pipeline.VideoRequest` of the options: ``preset`` and ``size`` from
    :func:`run_choices`, the sampling options as given (None: the preset's)."""
    from .pipeline import VideoRequest

    return VideoRequest(preset=preset, cfg=args.cfg, shift=args.shift, seed=args.seed,
                        motion_score=args.motion_score, **size)


def step_cache_from_args(args):
    """The :class:`~stepvideo_core.sampling.cache.StepCache` of ``--cache*`` (ValueError for bad values).

    ``--cache`` used to name the tiny model's folder; a value that is not a cache mode is still
    taken as that folder (now ``--tiny-cache``), with a note, so old command lines keep working.
    """
    from .sampling.cache import CACHE_MODES, StepCache

    if args.cache not in CACHE_MODES:
        print(f"note: --cache {args.cache} is read as the tiny model's folder (now --tiny-cache); --cache takes "
              f"a step-cache mode ({', '.join(CACHE_MODES)})", file=sys.stderr)
        args.tiny_cache = args.tiny_cache or args.cache
        args.cache = "off"
    return StepCache(mode=args.cache, threshold=args.cache_threshold, start=args.cache_start, end=args.cache_end,
                     sources=(args.cache_file,) if args.cache == "calibrated" else ())


def cache_summary(stats: dict) -> str:
    """The sampler's step-cache counts in words (DiT calls run and skipped)."""
    from .sampling.cache import summary

    return summary(stats)


def calibrate(args) -> int:
    """``calibrate-cache``: one uncached sampling run -> the step-cache calibration JSON; returns an exit code."""
    from .pipeline import OFFICIAL_NEGATIVE
    from .sampling import PRESETS
    from .sampling.cache import CACHE_FOLDER, save_calibration

    total_start = time.perf_counter()
    files = model_files(args)
    pipe = make_pipeline(args, files)
    ti2v = pipe.check_mode(args.image)
    preset, size = run_choices(args, files, ti2v)
    steps = size["steps"] or PRESETS[preset].steps
    print(f"Calibrating the step cache: {preset}, {steps} steps, {size['width']}x{size['height']}, "
          f"{size['frames']} frames on {pipe.device} (one uncached run, no decode) -> {args.out}")
    calibration = pipe.calibrate_cache(args.prompt, OFFICIAL_NEGATIVE if args.negative is None else args.negative,
                                       label=args.label or "", video=video_request(args, preset, size),
                                       image=args.image, add_magic=not args.no_magic, progress=progress_factory())
    out = save_calibration(args.out, calibration)
    ratios = calibration.ratios[1:] or (1.0,)
    print(f"Wrote the step-cache calibration of {calibration.describe()} to {out} (magnitude ratios "
          f"{min(ratios):.3f}-{max(ratios):.3f}) in {time.perf_counter() - total_start:.1f} s.")
    print(f"  Use it with: generate --cache calibrated --cache-file {out} (same weights, preset and steps); for "
          f"ComfyUI put the file in models/{CACHE_FOLDER}/.")
    if files.tiny:
        print("SMOKE TEST: measured on the embedded tiny model (random weights); it says nothing about real "
              "weights.")
    return 0


def _log_to(stream: TextIO) -> logging.Handler:
    """Show the pack's INFO messages on ``stream`` for the run (plain text); returns the handler to remove."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("StepVideo")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def add_generate_parser(sub) -> None:
    """The ``generate`` command's options."""

    p = sub.add_parser("generate", help="prompt -> .mp4 (a tiny random model when no --models is given)",
                       description="Generate a video headless, with the same pipeline as the ComfyUI nodes.")
    p.add_argument("--prompt", required=True, help="what the video shows (Chinese, English or both)")
    p.add_argument("--out", default="video.mp4", help="output .mp4 file (default: video.mp4)")
    add_model_file_args(p)
    run = p.add_argument_group("sampling (defaults: the preset's; size 992x544, 204 frames (TI2V: 102); tiny "
                               "model: 64x64, 17 frames, 3 steps)")
    add_sampling_args(run)
    add_cache_args(p)
    add_device_args(p)
    vid = p.add_argument_group("video file")
    vid.add_argument("--fps", type=FINITE_NUMBER, help="frames per second (default 25, the official rate)")
    vid.add_argument("--crf", type=int, help="H.264 quality, lower is better (default 23)")
    vid.add_argument("--crop-540p", action="store_true",
                     help="center-crop to 540x960 (960x540 portrait) like the official pipeline")


def add_model_file_args(p) -> None:
    """The model-file options of ``generate`` and ``calibrate-cache``."""
    files = p.add_argument_group("model files (default: the embedded tiny smoke-test model)")
    files.add_argument("--models", help="the official stepvideo-t2v (or stepvideo-ti2v) release folder "
                                        "(transformer/, vae/, step_llm/, hunyuan_clip/)")
    files.add_argument("--transformer", help="DiT to use instead of <models>/transformer: a folder (e.g. "
                                             "stepvideo-t2v-turbo's or stepvideo-ti2v's transformer/) or a "
                                             ".safetensors file (e.g. fp8)")
    files.add_argument("--vae", help="VAE instead of <models>/vae/vae_v2.safetensors")
    files.add_argument("--text-encoders", help="folder with step_llm/ and hunyuan_clip/ instead of <models>")
    files.add_argument("--tiny-cache", help="where the tiny default is cached (default: $STEPVIDEO_CACHE or "
                                            "~/.cache/stepvideo)")


def add_sampling_args(run) -> None:
    """The sampling options (preset, image, size, steps, guidance, seed, prompts, LoRAs) of both commands."""
    run.add_argument("--preset", default=None,
                     help="base (Step-Video-T2V: 50 steps, cfg 9, shift 13), turbo (Step-Video-T2V-Turbo: 15 steps, "
                          "cfg 5, shift 17) or ti2v (Step-Video-TI2V: 102 frames, 50 steps, cfg 9, shift 13, motion "
                          "score 5); default: ti2v for a TI2V transformer, else base")
    run.add_argument("--image", help="first frame (PNG, JPEG...): image-to-video; needs a Step-Video-TI2V "
                                     "transformer (the tiny default has one). Resized to cover the size, "
                                     "centre-cropped")
    run.add_argument("--motion-score", type=FINITE_NUMBER,
                     help="image-to-video only: how much motion (default 5; 2 steadier, 10-20 more motion)")
    run.add_argument("--width", type=int, help="multiple of 16")
    run.add_argument("--height", type=int, help="multiple of 16")
    run.add_argument("--frames", type=int, help="multiple of 17 (204 = 8 s at 25 fps)")
    run.add_argument("--steps", type=int)
    run.add_argument("--cfg", type=FINITE_NUMBER, help="guidance scale; 1 = no guidance (negative prompt unused)")
    run.add_argument("--shift", type=FINITE_NUMBER, help="time shift of the schedule")
    run.add_argument("--seed", type=int, default=1234, help="noise is drawn on the CPU: same video on every "
                                                             "machine (default 1234)")
    run.add_argument("--negative", help="negative prompt (default: the official one)")
    run.add_argument("--no-magic", action="store_true", help="do not append the official quality suffix")
    run.add_argument("--lora", action="append", default=[], metavar=LORA_SPEC, type=LORA_ARGUMENT,
                     help="a LoRA / .diff adapter (.safetensors) with an optional strength (default 1); repeat to "
                          "stack several")


def add_cache_args(p) -> None:
    """``generate``'s step-cache options."""
    from .sampling.cache import CACHE_MODES, CALIBRATION_FILE, DEFAULT_END, DEFAULT_START, DEFAULT_THRESHOLDS

    cache = p.add_argument_group("step cache (skip DiT calls whose output barely changes; default off)")
    cache.add_argument("--cache", default="off", metavar="{" + ",".join(CACHE_MODES) + "}",
                       help="off (every step calls the DiT); adaptive (EasyCache-style, no calibration: skips while "
                            "the change estimated from the input change stays under the threshold); calibrated "
                            "(MagCache-style: needs --cache-file from calibrate-cache for these weights, preset and "
                            "steps; the pack ships none it has not measured). Skipped steps reuse the last velocity "
                            "and stream no weights; the summary says how many DiT calls ran")
    cache.add_argument("--cache-threshold", type=FINITE_NUMBER,
                       help=f"skip while the accumulated estimate stays under this (default "
                            f"{DEFAULT_THRESHOLDS['adaptive']:g}; 0 never skips; higher is faster and further from "
                            f"the uncached video; calibrated also skips at most 2 steps in a row)")
    cache.add_argument("--cache-start", type=FINITE_NUMBER, default=DEFAULT_START,
                       help=f"no step before this fraction of the steps is skipped (default {DEFAULT_START:g}); "
                            f"the first step never is")
    cache.add_argument("--cache-end", type=FINITE_NUMBER, default=DEFAULT_END,
                       help=f"no step from this fraction of the steps on is skipped (default {DEFAULT_END:g}); "
                            f"the last step never is")
    cache.add_argument("--cache-file", default=CALIBRATION_FILE,
                       help=f"calibrated mode: the calibration JSON (or a folder of them) written by calibrate-cache "
                            f"(default: {CALIBRATION_FILE})")


def add_device_args(p) -> None:
    """The device and memory options of both commands."""
    from .attention import BACKENDS
    from .dit.loader import WEIGHT_FORMATS
    from .text.streaming import PLANS

    dev = p.add_argument_group("device and memory")
    dev.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    dev.add_argument("--dtype", choices=["default", *sorted(DTYPES)], default="default",
                     help="DiT and VAE compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    dev.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto",
                     help="DiT block weights: auto (follow the file), full, fp8_scaled (half the memory)")
    dev.add_argument("--blocks-on-device", default="auto",
                     help="DiT blocks kept on the GPU: auto (planned from free memory), all, or a number; "
                          "the others are streamed from RAM")
    dev.add_argument("--attention", choices=BACKENDS, default="sdpa")
    dev.add_argument("--text-plan", choices=PLANS, default="auto",
                     help="text encoder placement: auto, resident, stream (layer by layer) or cpu")
    dev.add_argument("--parallel", choices=("auto", "ulysses", "cfg"), default="auto",
                     help="under torchrun (--nproc_per_node N): ulysses = sequence parallel over N ranks (N must "
                          "divide the 48 heads), cfg = the two guidance branches on two groups of ranks, auto = "
                          "cfg when guided and N is even, the rest sequence parallel. Ignored in one process")
    dev.add_argument("--compile", nargs="?", const="blocks", default="off", choices=COMPILE_MODES,
                     help="torch.compile the DiT's transformer blocks: --compile (= blocks) or --compile off "
                          "(default). The first step compiles (tens of seconds, once per process, size and LoRA "
                          "strength); a failed compile falls back to eager with one warning")


def add_calibrate_parser(sub) -> None:
    """The ``calibrate-cache`` command's options."""
    from .sampling.cache import CACHE_FOLDER, CALIBRATION_FILE

    p = sub.add_parser("calibrate-cache", help="measure the step cache's calibration for your weights (one "
                                               "uncached run) and write it to a JSON file",
                       description="One uncached sampling run (no VAE decode) recording the magnitude ratio of "
                                   "successive velocities at every step, written as a small JSON keyed by the "
                                   "DiT's identity (config and weight fingerprint), the preset and the step count, "
                                   "for generate --cache calibrated and the StepVideo Sampler node (ComfyUI: "
                                   f"models/{CACHE_FOLDER}/). The pack ships no calibration it has not "
                                   "measured; a run takes minutes on a GPU at the official size.")
    p.add_argument("--prompt", default=CALIBRATION_PROMPT,
                   help=f"the prompt of the calibration run (default: {CALIBRATION_PROMPT!r})")
    p.add_argument("--out", default=CALIBRATION_FILE,
                   help=f"calibration JSON to write; an entry with the same model, preset and steps is replaced, "
                        f"others are kept (default: {CALIBRATION_FILE})")
    p.add_argument("--label", help="a name stored with the entry, for people (default: the model folder's name)")
    add_model_file_args(p)
    run = p.add_argument_group("sampling (as generate; calibrate with the preset, steps and size you will use)")
    add_sampling_args(run)
    add_device_args(p)


def parse_lora(spec: str) -> tuple:
    """(path, strength) of a ``--lora FILE[:STRENGTH]`` argument; raises ValueError saying what is wrong.

    The text after the last ':' is the strength (default 1) and must be a finite number,
    unless it begins with a path separator: then that colon belongs to the path (a Windows
    drive, ``C:\\loras\\x.safetensors``).  A file name that contains ':' itself therefore needs
    an explicit strength (``odd:name.safetensors:1``).
    """
    path, sep, strength = spec.rpartition(":")
    if not sep or strength.startswith(("\\", "/")):
        return spec, 1.0
    hint = f" (expected {LORA_SPEC}, e.g. style.safetensors:0.8)"
    if not path:
        raise ValueError(f"{spec!r}: no file name before the ':'{hint}")
    try:
        return path, finite_float(strength, "the strength")
    except ValueError as exc:
        raise ValueError(f"{spec!r}: {exc}{hint}") from None


def argument_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse`` as an argparse ``type=``: its ValueError becomes argparse's own error, which names the flag.

    Exists so that a bad value (``--cfg nan``, ``--lora x.safetensors:abc``) is refused while the
    command line is parsed -- ``argument --cfg: must be a finite number, got 'nan'`` -- before
    anything is loaded.
    """
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


FINITE_NUMBER = argument_type(finite_float)
LORA_ARGUMENT = argument_type(parse_lora)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="load a DiT (tiny random one by default) and run one forward")
    p_check.add_argument("--transformer", help="stepvideo-t2v folder, its transformer/ folder or a .safetensors file")
    p_check.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p_check.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_check.add_argument("--attention", default="sdpa")
    add_generate_parser(sub)
    add_calibrate_parser(sub)
    args = parser.parse_args(argv)
    from .attention import AttentionBackendError
    from .checkpoint import CheckpointError
    from .checks import NonFiniteError

    handler = _log_to(sys.stderr)
    try:
        if args.command == "check":
            return check(args.transformer, DTYPES[args.dtype], args.device, args.attention)
        if args.command == "generate":
            try:
                return generate(args)
            finally:
                from .parallel.run import leave
                leave()
        if args.command == "calibrate-cache":
            return calibrate(args)
    except (CheckpointError, AttentionBackendError, NonFiniteError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        logging.getLogger("StepVideo").removeHandler(handler)
    return 2


if __name__ == "__main__":
    sys.exit(main())
