"""Text -> video (and image -> video) without ComfyUI: the calls the nodes make, in one object.

:class:`StepVideoPipeline` runs what a node graph runs, in the same order and
through the same core functions: ``load_text_encoder`` + ``encode`` (the text
nodes), ``load_transformer`` + the memory planner + ``sample`` (model loader and
sampler nodes), ``load_vae`` + ``decode`` (VAE nodes).  Between the phases it
frees what is no longer needed, so the 19.6B text encoder and the 30B DiT never
sit in memory together.

Image-to-video runs when the transformer is Step-Video-TI2V (told from its file
headers): the first-frame image is read, resized and cropped to the video size
and VAE-encoded into the condition (:mod:`stepvideo_core.condition`) after the
text encoders are freed; sampling then follows the TI2V preset (102 frames,
motion score 5) and the TI2V magic prompts unless told otherwise.

Everything is checked before any weight is read: the video size, the sampling
settings, the attention backend, the model files (folder layout and file
headers) and whether the transformer fits the request (an image for a T2V
transformer, none for a TI2V one), so a typo costs a second, not a 40 GB load.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .attention import check_backend
from .checkpoint import CheckpointError
from .checks import finite_float
from .compile import CompiledBlocks, CompileSettings
from .dtypes import DTYPE_NAMES, default_dtype
from .condition import ImageConditionError, check_image, image_condition, image_from_file, image_noise_generator
from .dit.loader import (detect_weight_format, find_transformer_files, load_transformer, meta_transformer,
                         resolve_config)
from .memory import available_host_bytes, trim_host_heap
from .offload.planner import weight_bytes
from .sampling import (PRESETS, Placement, SamplingSettings, check_video_size, preset_for, resolve_motion_score,
                       resolve_settings)
from .sampling.cache import Calibration, StepCache, calibration_from_stats, model_identity
from .sampling.run import DiTSetup, check_blocks_choice, check_plan, plan_and_sample, plan_blocks
from .text.clip import CLIP_DIR
from .text.encoder import (ClipFolderNotFound, load_text_encoder, magic_prompts,
                           resolve_text_encoder_dirs, with_magic)
from .text.llm_loader import STEP_LLM_DIR, find_step_llm_files
from .text.streaming import PLANS, default_device
from .text.tokenizer import find_tokenizer_file
from .vae.loader import find_vae_file, load_vae
from .video_io import official_to_uint8

log = logging.getLogger("StepVideo")

PathLike = Union[str, Path]
# (phase, total) -> update(done, total); phases: "text encoders", "sampling", "VAE decode".
ProgressFactory = Callable[[str, int], Callable[[int, int], None]]
PRESET_ALIASES = {"base": "Step-Video-T2V", "t2v": "Step-Video-T2V", "turbo": "Step-Video-T2V-Turbo",
                  "ti2v": "Step-Video-TI2V", "i2v": "Step-Video-TI2V"}
RELEASE_DIRS = ("stepvideo-t2v", "stepvideo-ti2v")  # what a --models folder may hold instead of being one
ImageInput = Union[str, Path, torch.Tensor]


class _OfficialNegative:
    """The default ``negative`` of :meth:`StepVideoPipeline.generate`: the official negative prompt of the
    transformer's mode (T2V or TI2V), chosen once the mode is known."""

    def __repr__(self) -> str:
        return "<the official negative prompt of the mode>"


OFFICIAL_NEGATIVE = _OfficialNegative()


def resolve_preset(name: str) -> str:
    """The preset key for ``name``: a key of PRESETS, or an alias (base, t2v, turbo), any case."""
    for key in PRESETS:
        if key.lower() == name.lower():
            return key
    if name.lower() in PRESET_ALIASES:
        return PRESET_ALIASES[name.lower()]
    raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)} or {sorted(PRESET_ALIASES)}")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Where each part of Step-Video-T2V (or -TI2V: only its transformer differs) is read from."""

    transformer: Path
    vae: Path
    step_llm: Path
    hunyuan_clip: Path
    tiny: bool = False

    @classmethod
    def from_release(cls, root: Optional[PathLike] = None, *, transformer: Optional[PathLike] = None,
                     vae: Optional[PathLike] = None, text_encoders: Optional[PathLike] = None,
                     tiny: bool = False) -> "ModelFiles":
        """Resolve the files of an official ``stepvideo-t2v`` (or ``-ti2v``) release at ``root``, with overrides.

        ``root`` holds ``transformer/``, ``vae/vae_v2.safetensors``, ``step_llm/`` and
        ``hunyuan_clip/`` (or has a ``stepvideo-t2v/`` or ``stepvideo-ti2v/`` folder that does).  ``transformer``
        replaces the DiT (a Turbo transformer folder, an fp8 single file...), ``vae`` the
        VAE file, ``text_encoders`` the folder holding ``step_llm/`` and ``hunyuan_clip/``.
        Only folder layouts and file headers are read.  Raises CheckpointError naming every
        part that is missing.
        """
        base = None
        if root is not None:
            base = Path(root).expanduser()
            if not base.is_dir():
                raise CheckpointError(f"--models: no such folder: {base}")
            if not (base / "transformer").is_dir():
                base = next((base / name for name in RELEASE_DIRS if (base / name).is_dir()), base)
        problems, found = [], {}
        parts = {"transformer": transformer, "vae": vae, "text_encoders": text_encoders}
        for name, override in parts.items():
            where = Path(override).expanduser() if override is not None else base
            if where is None:
                problems.append(f"{name}: not given (pass --models with the stepvideo-t2v release folder, "
                                f"or --{name.replace('_', '-')})")
                continue
            try:
                if name == "transformer":
                    find_transformer_files(where)
                    found[name] = where
                elif name == "vae":
                    found[name] = find_vae_file(where)
                else:
                    found["step_llm"], found["hunyuan_clip"] = _text_encoder_dirs(where, override is not None)
                    find_step_llm_files(found["step_llm"])
                    find_tokenizer_file(found["step_llm"])
            except CheckpointError as exc:
                problems.append(f"{name}: {exc}")
        if problems:
            raise CheckpointError("model files not usable:\n  " + "\n  ".join(problems))
        return cls(transformer=found["transformer"], vae=found["vae"], step_llm=found["step_llm"],
                   hunyuan_clip=found["hunyuan_clip"], tiny=tiny)


def _text_encoder_dirs(where: Path, overridden: bool) -> tuple[Path, Path]:
    """(step_llm, hunyuan_clip) folders under ``where``; a missing hunyuan_clip/ is reported in terms of
    :meth:`ModelFiles.from_release`'s inputs (the CLI flags), not of resolve_text_encoder_dirs' ``clip_dir``."""
    try:
        return resolve_text_encoder_dirs(where)
    except ClipFolderNotFound as exc:
        flag = "--text-encoders" if overridden else "--models (or --text-encoders)"
        raise CheckpointError(f"no {CLIP_DIR}/ folder next to {exc.llm_dir}: {flag} must be the folder that holds "
                              f"both {STEP_LLM_DIR}/ and {CLIP_DIR}/ (the stepvideo-t2v release root)") from exc


@dataclasses.dataclass(frozen=True)
class VideoRequest:
    """What :meth:`StepVideoPipeline.generate` makes; each None comes from the preset when the mode is known.

    ``preset``: a key of PRESETS or an alias (None: the transformer's, Step-Video-T2V or Step-Video-TI2V);
    ``frames`` (None: the preset's, 204 or 102 for TI2V), ``steps`` / ``cfg`` / ``shift`` (None: the
    preset's, :func:`~stepvideo_core.sampling.resolve_settings`), ``motion_score`` (TI2V only; None: the
    preset's 5).  Resolved and checked by :meth:`StepVideoPipeline.generate` before anything loads.
    """

    preset: Optional[str] = None
    width: int = 992
    height: int = 544
    frames: Optional[int] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    shift: Optional[float] = None
    seed: int = 0
    motion_score: Optional[float] = None


@dataclasses.dataclass
class GenerationResult:
    """One generated video: ``frames`` uint8 ``[T, H, W, 3]`` plus what produced it."""

    frames: torch.Tensor
    settings: dict
    plan: dict
    seconds: dict
    notes: list
    cache: dict = dataclasses.field(default_factory=dict)  # the sampler's step-cache stats (DiT calls, skips)


class StepVideoPipeline:
    """Prompt -> frames with Step-Video-T2V (see the module docstring for the phases).

    ``device``: where everything computes (default CUDA if present); weights rest on the
    CPU between phases, as in ComfyUI.  ``dtype``: compute dtype of the DiT and the VAE
    (default bf16 on CUDA, fp32 on CPU).  ``weight_format``: "auto" (follow the file),
    "full" or "fp8_scaled" (DiT block weights stored in fp8).  ``blocks_on_device``:
    "auto", "all" or a number (block streaming).  ``text_plan``: the text encoder's
    device plan (auto/resident/stream/cpu); ``text_dtype`` its Step-LLM dtype (bf16,
    the release's).  The text encoder is freed after every encode; the DiT and the VAE
    are dropped at the end of :meth:`generate` unless ``keep_models`` (then later calls
    skip loading them, but the text encoder and the DiT share RAM while encoding).
    ``loras``: (path, strength) pairs, applied for each sampling run exactly as the
    StepVideoLoraLoader nodes chain them.  They are read and validated here, before any
    weight is read (see :meth:`_load_adapters`); :attr:`adapters` holds the result.
    A Step-Video-TI2V transformer makes :meth:`generate` image-to-video (:attr:`is_ti2v`).
    ``compile``: "off" (default) or "blocks": ``torch.compile`` of the DiT's transformer blocks for every
    sampling run (:mod:`stepvideo_core.compile`; falls back to eager with one warning when compiling fails).
    """

    def __init__(self, files: ModelFiles, *, device: Union[None, str, torch.device] = None,
                 dtype: Optional[torch.dtype] = None, weight_format: str = "auto", attention: str = "sdpa",
                 blocks_on_device: Union[str, int] = "auto", text_plan: str = "auto",
                 text_dtype: torch.dtype = torch.bfloat16, alibi: bool = True, keep_models: bool = False,
                 loras: Sequence[tuple] = (), compile: Union[None, str, CompileSettings] = None):
        self.files = files
        self.compile = CompileSettings.parse(compile)  # "off"/"blocks" or CompileSettings, checked now
        self.last_compile: Optional[CompiledBlocks] = None  # the last sampling run's compile state (summary())
        self.loras = [(Path(path), finite_float(strength, f"the strength of LoRA {Path(path).name}"))
                      for path, strength in loras]
        missing = [str(path) for path, _ in self.loras if not path.exists()]
        if missing:
            raise CheckpointError(f"LoRA file not found: {', '.join(missing)}")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        if text_plan not in PLANS:
            raise ValueError(f"text_plan must be one of {PLANS}, got {text_plan!r}")
        choice = check_blocks_choice(blocks_on_device)
        check_backend(attention, self.device, self.dtype)
        self.weight_format, self.attention, self.blocks_on_device = weight_format, attention, choice
        self.text_plan, self.text_dtype, self.alibi = text_plan, text_dtype, alibi
        self.keep_models = keep_models
        self._transformer = None
        self._vae = None
        self._config = None
        self._adapters = self._load_adapters() if self.loras else ()
        # A ParallelContext when this process is one rank of a torchrun run (stepvideo_core.parallel.run):
        # rank 0 encodes the text and broadcasts it, every rank samples its share, the decode is split.
        self.parallel = None

    def transformer_config(self):
        """The DiT's config (:class:`~stepvideo_core.dit.StepVideoDiTConfig`) from config.json and the file
        headers, without reading a weight (the loaded model's once it is loaded)."""
        if self._transformer is not None:
            return self._transformer.config
        if self._config is None:
            index, config_path = find_transformer_files(self.files.transformer)
            self._config = resolve_config(index, config_path)
        return self._config

    @property
    def is_ti2v(self) -> bool:
        """True when the transformer is Step-Video-TI2V (image-to-video), told from its headers alone."""
        return self.transformer_config().is_ti2v

    def check_mode(self, image: Optional[ImageInput]) -> bool:
        """Whether this run is image-to-video; raises ValueError when ``image`` does not fit the transformer.

        Exists so that an image given to a Step-Video-T2V transformer, or none to a Step-Video-TI2V
        one, fails in a second with both named, before the text encoders or the DiT are read.
        """
        ti2v = self.is_ti2v
        where = self.files.transformer
        if image is not None and not ti2v:
            raise ValueError(f"an image was given (image-to-video, --image), but the transformer {where} is "
                             f"Step-Video-T2V (text-to-video): use a Step-Video-TI2V transformer (the stepvideo-ti2v "
                             f"release's transformer/, --transformer) or leave the image out")
        if image is None and ti2v:
            raise ValueError(f"the transformer {where} is Step-Video-TI2V (image-to-video): it needs a first-frame "
                             f"image (--image first.png); for text-to-video use a Step-Video-T2V transformer")
        return ti2v

    @property
    def adapters(self) -> tuple:
        """The ``loras`` as validated :class:`~stepvideo_core.lora.LoraEntry` objects, applied for each run."""
        return self._adapters

    # -- phases ----------------------------------------------------------------
    def encode(self, prompt: str, negative: Optional[str] = OFFICIAL_NEGATIVE, add_magic: bool = True,
               progress: Optional[ProgressFactory] = None, magic: Optional[str] = None
               ) -> tuple[dict, Optional[dict], list]:
        """(positive, negative or None, notes): DiT conditioning dicts of batch 1, on the CPU.

        Loads the text encoders, encodes ``with_magic(prompt, add_magic, magic)`` and then
        ``negative`` (None: skipped, for runs without guidance) one at a time as the two text
        nodes do (so a graph and this pipeline get the very same tensors), then frees the
        encoders.  ``magic`` and the default ``negative`` are the official pair of the
        transformer's mode (:func:`~stepvideo_core.text.encoder.magic_prompts`: T2V or TI2V).
        ``notes`` are truncation warnings.
        """
        if magic is None or negative is OFFICIAL_NEGATIVE:
            mode_magic, mode_negative = magic_prompts("ti2v" if self.is_ti2v else "t2v")
            magic = mode_magic if magic is None else magic
            negative = mode_negative if negative is OFFICIAL_NEGATIVE else negative
        start = time.perf_counter()
        encoder = load_text_encoder(self.files.step_llm, self.files.hunyuan_clip, dtype=self.text_dtype,
                                    device=self.device, plan=self.text_plan, alibi=self.alibi)
        log.info("text encoders loaded in %.1f s (%s)", time.perf_counter() - start,
                 encoder.describe().replace("\n", "; "))
        texts = [with_magic(prompt, add_magic, magic)] + ([negative] if negative is not None else [])
        try:
            notes = encoder.notes(texts)
            steps = len(encoder.llm.layers) + 1
            update = progress("text encoders", steps * len(texts)) if progress else None
            rows = []
            for i, text in enumerate(texts):
                callback = (lambda done, _total, base=i * steps: update(base + done, steps * len(texts))) \
                    if update else None
                rows.append(encoder.encode([text], callback=callback))
        finally:
            del encoder
            self._release_memory()
        return rows[0], (rows[1] if negative is not None else None), notes

    def transformer(self) -> torch.nn.Module:
        """The DiT, loaded on first use (weights rest on the CPU, compute on :attr:`device`)."""
        if self._transformer is None:
            start = time.perf_counter()
            self._transformer = load_transformer(self.files.transformer, dtype=self.dtype, device="cpu",
                                                 attention=self.attention, weight_format=self.weight_format)
            cfg = self._transformer.config
            log.info("DiT loaded in %.1f s: %d blocks, width %d, %s weights, compute %s on %s",
                     time.perf_counter() - start, cfg.num_layers, cfg.inner_dim, self._transformer.weight_format,
                     DTYPE_NAMES.get(self.dtype, self.dtype), self.device)
        return self._transformer

    def _load_adapters(self) -> tuple:
        """The ``loras`` read, checked and bound to the DiT's architecture, as LoraEntry objects.

        Exists so that a bad adapter (unreadable, NaN/Inf values, keys or shapes that do not
        fit, zero matches: LoraError) fails in a second, before the text encoders and the DiT
        are read.  The binding uses module names and shapes only, so it is made against the
        DiT built on the meta device from config.json and the headers, and holds for the
        loaded model too (full or fp8 block weights: same names, same shapes); each file is
        therefore read once per pipeline.
        """
        from .lora import LoraEntry, load_lora

        architecture = meta_transformer(self.files.transformer)
        entries = []
        for path, strength in self.loras:
            adapter = load_lora(path, architecture)
            log.info("LoRA %s (strength %g): %s", path.name, strength, adapter.report().replace("\n", "; "))
            entries.append(LoraEntry(adapter, strength))
        return tuple(entries)

    def vae(self):
        """The VAE, loaded on first use on :attr:`device`."""
        if self._vae is None:
            start = time.perf_counter()
            self._vae = load_vae(self.files.vae, dtype=self.dtype, device=self.device)
            log.info("VAE loaded in %.1f s", time.perf_counter() - start)
        return self._vae

    def encode_image(self, image: ImageInput, *, width: int, height: int, frames: int, seed: int) -> torch.Tensor:
        """The TI2V condition ``[1, frames/17*3, z, height/16, width/16]`` (fp32, CPU) of ``image``.

        ``image`` is an image file or an RGB tensor [3, h, w] in [-1, 1]; it is resized to cover
        ``width x height``, centre-cropped and VAE-encoded as one frame (the posterior sample, drawn
        from a CPU generator seeded from ``seed``: :func:`~stepvideo_core.condition.image_noise_generator`),
        then followed by zero latent frames (:func:`~stepvideo_core.condition.image_condition`).  On a GPU
        the VAE is freed afterwards (unless ``keep_models``) so the DiT gets its memory; decode reads it again.
        """
        pixels = read_image(image)
        start = time.perf_counter()
        condition = image_condition(self.vae(), pixels, width=width, height=height, frames=frames,
                                    generator=image_noise_generator(seed))
        log.info("image condition: %dx%d image -> %s latent in %.1f s", pixels.shape[2], pixels.shape[1],
                 list(condition.shape), time.perf_counter() - start)
        if self.device.type != "cpu" and not self.keep_models:
            self._vae = None
            self._release_memory()
        return condition

    def sample(self, positive: dict, negative: Optional[dict], settings: SamplingSettings, *,
               progress: Optional[ProgressFactory] = None, should_stop: Optional[Callable[[], bool]] = None,
               condition: Optional[torch.Tensor] = None, cache: Optional[StepCache] = None,
               stats: Optional[dict] = None, preset: Optional[str] = None) -> tuple[torch.Tensor, dict]:
        """(latents fp32 ``[1, F, C, h, w]`` on the CPU, the block plan) -- the sampler node's work.

        ``settings``: the run's size and sampling settings (``motion_score`` for a Step-Video-TI2V
        transformer only); ``condition``: the TI2V image condition (:meth:`encode_image`), see
        :func:`~stepvideo_core.sampling.sample`.  ``cache`` / ``stats``: the step cache and the dict its
        counts go to (see ``sample``); a calibrated cache without its calibration finds it in its sources
        for this model, ``preset`` and the step count (CalibrationNotFound otherwise).  The orchestration
        (plan, adapters, compile) is :func:`~stepvideo_core.sampling.run.plan_and_sample`, as in the node.
        """
        model = self.transformer()
        if cache is not None and cache.mode == "calibrated" and cache.calibration is None:
            if preset is None:
                raise ValueError("the calibrated step cache needs the preset (calibrations are keyed by it)")
            cache = cache.resolved(model, preset, settings.steps)
        if cache is not None and cache.record_ratios and stats is not None:
            stats["model"] = model_identity(model)  # the base weights', before any LoRA is merged in
        update = progress("sampling", settings.steps) if progress else None
        run = plan_and_sample(model, positive, negative, settings, setup=self._setup(model.weight_format),
                              placement=Placement(device=self.device, parallel=self.parallel),
                              on_step=(lambda i, n, _latents: update(i, n)) if update else None,
                              should_stop=should_stop, condition=condition, cache=cache, stats=stats)
        self.last_compile = run.compiled
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return run.latents, run.plan

    def _setup(self, weight_format: str) -> DiTSetup:
        """This pipeline's DiT choices for a transformer whose block weights are stored as ``weight_format``."""
        return DiTSetup(compute_dtype=self.dtype, weight_format=weight_format, attention=self.attention,
                        blocks_on_device=self.blocks_on_device, adapters=self._adapters, compile=self.compile)

    def check_memory(self, settings: SamplingSettings) -> Optional[dict]:
        """On the CPU, refuse a run that cannot fit in RAM before anything loads; returns the plan (None on a GPU).

        Made from config.json and the file headers: the RAM available now, less the DiT's weights
        when they are not loaded yet (the text encoders are freed before the DiT loads), must hold
        the run's activations (:func:`check_plan`).  Exists so that an impossible size costs a
        second, not a text-encoder and DiT load; :meth:`sample` checks again once the DiT is in RAM.
        A GPU run is planned when it samples (its free memory is only known then).
        """
        if self.device.type != "cpu":
            return None
        index, config_path = find_transformer_files(self.files.transformer)
        config = self.transformer_config()
        stored = detect_weight_format(index) if self.weight_format == "auto" else self.weight_format
        setup = self._setup(stored)
        available = available_host_bytes()
        if available is not None and self._transformer is None:
            inputs = setup.plan_inputs(config, settings)
            sizes = weight_bytes(inputs.weight_format, inputs.compute_dtype, inputs.config)
            available = max(0, available - sizes["layers"] * sizes["block"] - sizes["non_block"])
        plan = plan_blocks(config, setup, settings, device=self.device, free_bytes=available)
        check_plan(plan)
        return plan

    def decode(self, latents: torch.Tensor, progress: Optional[ProgressFactory] = None,
               should_stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` of ``latents`` ``[1, F, C, h, w]``: VAE decode + official post-processing.

        On a parallel run the 3-latent chunks are shared among the ranks and gathered in order
        (:func:`~stepvideo_core.parallel.vae.decode_split`); every rank gets the frames.
        """
        update = progress("VAE decode", max(latents.shape[1] // 3, 1)) if progress else None
        if self.parallel is not None:
            from .parallel.vae import decode_split
            video = decode_split(self.vae(), latents.to(self.device), on_chunk=update).cpu()
        else:
            video = self.vae().decode(latents, on_chunk=update, should_stop=should_stop, output_device="cpu")
        return official_to_uint8(video)

    def _encode_once(self, *args, **kwargs):
        """:meth:`encode` on rank 0 only, its result broadcast to the other ranks of a parallel run
        (the 19.6B text encoder is loaded once); a plain :meth:`encode` otherwise."""
        if self.parallel is None:
            return self.encode(*args, **kwargs)
        result = self.encode(*args, **kwargs) if self.parallel.is_first else None
        return self.parallel.broadcast_tensors(result)

    def generate(self, prompt: str, negative: Optional[str] = OFFICIAL_NEGATIVE, video: VideoRequest = VideoRequest(),
                 *, image: Optional[ImageInput] = None, add_magic: bool = True,
                 progress: Optional[ProgressFactory] = None, should_stop: Optional[Callable[[], bool]] = None,
                 cache: Optional[StepCache] = None, decode: bool = True) -> GenerationResult:
        """One video for ``prompt`` (from the first frame ``image`` on TI2V); see :class:`GenerationResult`.

        ``video``: the size and sampling settings (:class:`VideoRequest`; what it leaves None comes from
        the preset, the transformer's by default).  The magic suffix and the default negative prompt
        are the official ones of the mode; the negative is not encoded when cfg <= 1.  ``image`` is an
        image file or an RGB tensor [3, h, w] in [-1, 1]: required by a Step-Video-TI2V transformer,
        refused by a T2V one.  Size, settings, the image and the mode are checked before anything is
        loaded.  Without ``keep_models`` the DiT and the VAE are freed before returning.  ``cache``: the
        sampler's step cache (:class:`~stepvideo_core.sampling.cache.StepCache`; its counts land in the
        result's ``cache``); a calibrated one must find a calibration for the preset and step count
        before anything loads.  ``decode`` False stops after sampling (``frames`` is None;
        :meth:`calibrate_cache` needs no video).
        """
        ti2v = self.check_mode(image)
        preset, run = self._resolve(video, ti2v)
        pixels = read_image(image) if ti2v else None  # a bad image file fails now, not after the text encoders
        magic, mode_negative = magic_prompts("ti2v" if ti2v else "t2v")
        negative = mode_negative if negative is OFFICIAL_NEGATIVE else negative
        guided = run.guided
        if cache is not None:
            cache.check_sources(preset, run.steps)  # a missing calibration fails now, not after the text
        self.check_memory(run)
        seconds = {}
        cache_stats = {}
        start = time.perf_counter()
        positive, neg, notes = self._encode_once(prompt, (negative or "") if guided else None, add_magic, progress,
                                           magic=magic)
        seconds["text"] = time.perf_counter() - start
        for note in notes:
            log.warning("%s", note)
        try:
            condition = None
            if ti2v:
                start = time.perf_counter()
                condition = self.encode_image(pixels, width=run.width, height=run.height, frames=run.frames,
                                              seed=run.seed)
                seconds["image"] = time.perf_counter() - start
            start = time.perf_counter()
            latents, plan = self.sample(positive, neg, run, progress=progress, should_stop=should_stop,
                                        condition=condition, cache=cache, stats=cache_stats, preset=preset)
            seconds["sample"] = time.perf_counter() - start
            pixels_out = None
            if decode:
                start = time.perf_counter()
                pixels_out = self.decode(latents, progress, should_stop)
                seconds["decode"] = time.perf_counter() - start
        finally:
            if not self.keep_models:
                self.unload()
        settings = dict(prompt=prompt, negative=(negative or "") if guided else None, add_magic=add_magic,
                        preset=preset, width=run.width, height=run.height, frames=run.frames, seed=run.seed,
                        steps=run.steps, cfg=run.cfg, shift=run.shift)
        if ti2v:
            settings.update(mode="ti2v", motion_score=run.motion_score,
                            image=str(image) if not isinstance(image, torch.Tensor) else "tensor")
        else:
            settings.update(mode="t2v")
        if cache is not None:
            settings.update(cache=cache.describe())
        if self.compile.enabled and self.last_compile is not None:
            settings.update(compile=self.last_compile.summary())
        return GenerationResult(frames=pixels_out, settings=settings, plan=plan, seconds=seconds, notes=notes,
                                cache=cache_stats)

    def _resolve(self, video: VideoRequest, ti2v: bool) -> tuple[str, SamplingSettings]:
        """(preset key, the run's settings) of ``video`` for this mode, each None from the preset; checked.

        Raises ValueError for a preset or a motion score the transformer's mode cannot take, a video size
        the VAE's grid does not allow, and sampling settings out of range.
        """
        preset = resolve_preset(video.preset) if video.preset is not None else preset_for(ti2v)
        if PRESETS[preset].image and not ti2v:
            raise ValueError(f"preset {preset} is for a Step-Video-TI2V (image-to-video) transformer; "
                             f"{self.files.transformer} is Step-Video-T2V: pick base or turbo")
        if video.motion_score is not None and not ti2v:
            raise ValueError("motion_score is an image-to-video setting: the transformer is Step-Video-T2V")
        frames = PRESETS[preset].frames if video.frames is None else video.frames
        check_video_size(video.width, video.height, frames)
        chosen = resolve_settings(preset, video.steps, video.cfg, video.shift)
        motion = resolve_motion_score(preset, video.motion_score) if ti2v else None
        return preset, SamplingSettings(video.width, video.height, frames, seed=video.seed, motion_score=motion,
                                        **chosen)

    def calibrate_cache(self, prompt: str, negative: Optional[str] = OFFICIAL_NEGATIVE, *, label: str = "",
                        **generate_kwargs) -> Calibration:
        """The step-cache :class:`~stepvideo_core.sampling.cache.Calibration` of this pipeline's DiT.

        One uncached :meth:`generate` run (same arguments; no VAE decode) recording the magnitude
        ratio of successive velocities at every step, keyed by the DiT's identity, the preset and the
        step count.  Save it with :func:`~stepvideo_core.sampling.cache.save_calibration`.
        """
        result = self.generate(prompt, negative, cache=StepCache(record_ratios=True), decode=False,
                               **generate_kwargs)
        run = result.settings
        measured = {k: run[k] for k in ("width", "height", "frames", "seed", "mode") if k in run}
        measured.update(dtype=DTYPE_NAMES.get(self.dtype, str(self.dtype)), device=str(self.device),
                        weight_format=self.weight_format, transformer=str(self.files.transformer),
                        loras=[f"{path.name}:{strength:g}" for path, strength in self.loras])
        return calibration_from_stats(result.cache, preset=run["preset"], cfg=run["cfg"], shift=run["shift"],
                                      label=label or Path(self.files.transformer).name, **measured)

    def unload(self) -> None:
        """Drop the DiT and the VAE (the next :meth:`generate` loads them again; the adapters stay)."""
        self._transformer = self._vae = None
        self._config = None
        self._release_memory()

    def _release_memory(self) -> None:
        """Give freed memory back: Python objects, CUDA's cache, the host heap (glibc)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        trim_host_heap()


def read_image(image: ImageInput) -> torch.Tensor:
    """The first-frame image as the official RGB ``[3, h, w]`` in [-1, 1]: a file read with
    :func:`~stepvideo_core.condition.image_from_file`, or a tensor checked as it is.

    Raises :class:`~stepvideo_core.condition.ImageConditionError` (a ValueError) for a missing,
    unreadable or malformed image, naming what was expected and found.
    """
    if isinstance(image, torch.Tensor):
        check_image(image)
        return image
    if not isinstance(image, (str, Path)):
        raise ImageConditionError(f"the image must be a file path or an RGB tensor [3, h, w], got "
                                  f"{type(image).__name__}")
    return image_from_file(image)
