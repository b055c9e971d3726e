"""Prompt -> DiT conditioning: Step-LLM + HunyuanCLIP, the official prompt conventions, a cache.

``StepVideoTextEncoder.encode(prompts)`` returns exactly what the DiT takes
(reference §2.4, §2.5), on the output device (the CPU by default):

* ``encoder_hidden_states``   [B, 320, 6144]  Step-LLM last hidden state;
* ``encoder_hidden_states_2`` [B, 77, 1024]   HunyuanCLIP ``last_hidden_state`` (fp32, then cast);
* ``encoder_attention_mask``  [B, 397] int64  77 ones (CLIP, padding included) then the Step-LLM mask.

Both embeddings come out in the Step-LLM's dtype (bf16 for the release, as the
official caption server returns them).

Prompt conventions of the official pipeline: the positive prompt is
``prompt + POSITIVE_MAGIC`` (plain concatenation), the negative prompt is
``NEGATIVE_PROMPT`` alone.  :func:`with_magic` applies the first; both strings
are data, editable by the caller.  Step-Video-TI2V (image-to-video) has its own
pair, :data:`TI2V_MAGIC` and :data:`TI2V_NEGATIVE_PROMPT`, applied the same way;
:func:`magic_prompts` picks the pair of a mode ("t2v" or "ti2v").

Cache: encoding is expensive (a 19.6B forward), so each prompt's rows are kept
in an in-memory LRU keyed by ``(model identity, prompt text, alibi, dtype,
Step-LLM length, CLIP length)``.  The model identity of a loaded encoder is its
folders plus the size and mtime of every file read.  The device plan is not in
the key: resident, streamed and CPU runs compute the same thing (bit for bit
on one device, up to kernel rounding across devices).

Releasing the weights: :meth:`StepVideoTextEncoder.release_weights` drops both
encoders' weights from memory (RAM and any device) while the tokenizers and the
cache stay; the next uncached encode reads them again from the files
(:meth:`~StepVideoTextEncoder.load_weights`), so identical prompts still come
from the cache and new ones cost one more read of the checkpoint.  It exists so
the 39 GB Step-LLM need not sit in RAM beside the DiT once the prompts are encoded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..checkpoint import CheckpointError, PathLike
from ..checkpoint import load_weights as load_module_weights
from ..memory import trim_host_heap
from .clip import CLIP_DIR, HunyuanClip, find_clip_dir, load_hunyuan_clip
from .llm_loader import find_step_llm_dir, find_step_llm_files, load_step_llm, read_step_llm_config
from .step_llm import StepLLM
from ..memory import cuda_free_vram
from .streaming import PLANS, choose_plan, default_device, on_device, run_step_llm
from .tokenizer import MAX_LENGTH, StepTokenizer, find_tokenizer_file

log = logging.getLogger("StepVideo")

# Official defaults (stepvideo/config.py --pos_magic / --neg_magic, reference §5).
POSITIVE_MAGIC = ("超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、"
                  "自然、生动、超细节、清晰。")
NEGATIVE_PROMPT = ("画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、"
                   "模糊。")
# Step-Video-TI2V's defaults (its stepvideo/config.py --pos_magic / --neg_magic; reference stepvideo-ti2v.md §3).
# Note the negative has no final "。", unlike the T2V one.
TI2V_MAGIC = ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、整体不变形、"
              "超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。")
TI2V_NEGATIVE_PROMPT = ("动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、"
                        "面部有褶皱、表情僵硬、畸形手指")
MAGIC_PROMPTS = {"t2v": (POSITIVE_MAGIC, NEGATIVE_PROMPT), "ti2v": (TI2V_MAGIC, TI2V_NEGATIVE_PROMPT)}
OUTPUT_KEYS = ("encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")


def magic_prompts(mode: str = "t2v") -> tuple[str, str]:
    """(positive suffix, negative prompt) the official pipeline of ``mode`` uses: "t2v" (also Turbo) or "ti2v".

    Exists so that callers pick the image-to-video pair by the transformer they run
    (``"ti2v" if model.is_ti2v else "t2v"``) instead of hard-coding either string.
    """
    key = str(mode).lower().replace("-", "").replace("_", "")
    key = {"stepvideot2v": "t2v", "stepvideot2vturbo": "t2v", "turbo": "t2v", "stepvideoti2v": "ti2v",
           "i2v": "ti2v"}.get(key, key)
    if key not in MAGIC_PROMPTS:
        raise ValueError(f"unknown prompt mode {mode!r}; expected 't2v' (text-to-video, Turbo too) or 'ti2v' "
                         f"(image-to-video)")
    return MAGIC_PROMPTS[key]


def drop_weights(module: nn.Module) -> int:
    """Replace every parameter and persistent buffer of ``module`` by a meta tensor of the same shape and dtype.

    Returns the bytes dropped.  The storage goes as soon as nothing else holds it, wherever it
    was (RAM or a device); the module keeps its structure, so it can be filled again in place
    (:func:`~stepvideo_core.checkpoint.load_weights`, ``load_state_dict(..., assign=True)``).
    Non-persistent buffers (not part of a checkpoint, e.g. BERT's ``position_ids``) are kept:
    nothing could read them back.
    """
    dropped = 0
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None and not param.is_meta:
                dropped += param.nbytes
                owner._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                       requires_grad=param.requires_grad)
        for name, buf in list(owner._buffers.items()):
            if buf is not None and not buf.is_meta and name not in owner._non_persistent_buffers_set:
                dropped += buf.nbytes
                owner._buffers[name] = torch.empty_like(buf, device="meta")
    return dropped


def with_magic(prompt: str, add_magic: bool = True, magic: str = POSITIVE_MAGIC) -> str:
    """The positive prompt as the official pipeline encodes it: ``prompt + magic`` (or ``prompt`` alone)."""
    return prompt + magic if add_magic else prompt


class StepVideoTextEncoder:
    """Both text encoders and the rules joining them; :meth:`encode` gives the DiT conditioning.

    ``device`` is where the encoders compute (default: CUDA if present); the
    weights stay where they were loaded (the CPU by default).  ``plan`` is one
    of ``auto`` / ``resident`` / ``stream`` / ``cpu`` (see :mod:`.streaming`);
    ``auto`` asks ``free_vram(device)`` (default: the CUDA driver) at each
    encode.  ``alibi`` overrides the Step-LLM's attention-bias switch.
    ``reload(encoder)`` puts the weights back after :meth:`release_weights` (set by
    :func:`load_text_encoder` to read them from the files); without it the weights
    cannot be released.
    """

    def __init__(self, llm: StepLLM, tokenizer: StepTokenizer, clip: HunyuanClip, *,
                 device: Union[None, str, torch.device] = None, plan: str = "auto", alibi: Optional[bool] = None,
                 free_vram: Optional[Callable[[torch.device], Optional[int]]] = None,
                 output_device: Union[str, torch.device] = "cpu", cache_size: int = 16,
                 identity: Optional[str] = None,
                 reload: Optional[Callable[["StepVideoTextEncoder"], None]] = None):
        if plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
        if tokenizer.vocab_size > llm.config.padded_vocab_size:
            raise CheckpointError(f"the tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} pieces but the "
                                  f"Step-LLM only {llm.config.padded_vocab_size} embeddings (mismatched files?)")
        self.llm, self.tokenizer, self.clip = llm, tokenizer, clip
        self.device = torch.device(device) if device is not None else default_device()
        self.plan = plan
        self.alibi = llm.alibi if alibi is None else bool(alibi)
        self.free_vram = free_vram or cuda_free_vram
        self.output_device = torch.device(output_device)
        self.cache_size = cache_size
        self.identity = identity or f"unnamed-encoder-{id(self):x}"
        self.max_length = MAX_LENGTH
        self.last_plan: Optional[str] = None
        self._cache: OrderedDict = OrderedDict()
        self._reload = reload
        self._released = False

    @property
    def dtype(self) -> torch.dtype:
        """The Step-LLM weight dtype, which is also the dtype of both output embeddings."""
        return self.llm.tok_embeddings.word_embeddings.weight.dtype

    @property
    def weights_released(self) -> bool:
        """True between :meth:`release_weights` and the next :meth:`load_weights` (or uncached encode)."""
        return self._released

    @property
    def can_release(self) -> bool:
        """Whether :meth:`release_weights` is possible: the encoder knows how to read its weights again."""
        return self._reload is not None

    def weight_bytes(self) -> int:
        """Bytes of both encoders' parameters and buffers (what :meth:`release_weights` gives back)."""
        return sum(t.nbytes for m in (self.llm, self.clip) for t in (*m.parameters(), *m.buffers()))

    def release_weights(self) -> int:
        """Drop both encoders' weights from memory (RAM and any device); returns the bytes released.

        Parameters become meta tensors of the same shapes (:func:`drop_weights`); the tokenizers,
        the configs and the cache stay, so cached prompts still answer at once.  The next
        uncached encode reads the weights again (:meth:`load_weights`).  Raises ValueError for
        an encoder that cannot read them again (built from modules, without ``reload``).
        """
        if self._reload is None:
            raise ValueError("this text encoder was not loaded from files (no reload), so its weights "
                             "cannot be released; load it with load_text_encoder")
        if self._released:
            return 0
        self._released = True
        dropped = drop_weights(self.llm) + drop_weights(self.clip)
        trim_host_heap()  # hand the freed heap pages back (see stepvideo_core.memory)
        log.info("StepVideo: text encoder weights released (%.2f GB); the next new prompt reads them again",
                 dropped / 1e9)
        return dropped

    def load_weights(self) -> bool:
        """Read the weights again after :meth:`release_weights`; returns True when it did (False: already there)."""
        if not self._released:
            return False
        self._reload(self)
        self._released = False
        return True

    def cache_key(self, prompt: str) -> tuple:
        """What a cached encoding depends on (see the module docstring)."""
        return (self.identity, prompt, self.alibi, str(self.dtype), self.max_length, self.clip.max_length)

    def is_cached(self, prompt: str) -> bool:
        """Whether :meth:`encode` would answer ``prompt`` from the cache."""
        return self.cache_key(prompt) in self._cache

    def notes(self, prompts: Union[str, Sequence[str]]) -> list[str]:
        """Warnings about ``prompts`` for logs and the node UI: Step-LLM truncation, CLIP's 77-token window."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = [cut.message() for cut in self.tokenizer(prompts, self.max_length, warn=False).truncated]
        for i, prompt in enumerate(prompts):
            count = self.clip.token_count(prompt)
            if count > self.clip.max_length:
                out.append(f"HunyuanCLIP: prompt {i + 1} is {count} tokens; like the official pipeline it reads "
                           f"the first {self.clip.max_length} (the Step-LLM reads up to {self.max_length - 2}).")
        return out

    def encode(self, prompts: Union[str, Sequence[str]],
               callback: Optional[Callable[[int, int], None]] = None) -> dict[str, torch.Tensor]:
        """Conditioning for ``prompts`` (a list of strings, batch order kept), through the cache.

        Returns a dict holding exactly :data:`OUTPUT_KEYS` (shapes in the module docstring).
        An empty list encodes like ``[""]`` (one [BOS, EOS] row, the official rule).
        ``callback(i, n)`` is called as the work proceeds (progress and interrupts).
        """
        prompts = [prompts] if isinstance(prompts, str) else (list(prompts) or [""])
        for cut in self.tokenizer(prompts, self.max_length, warn=False).truncated:
            log.warning("StepVideo: %s", cut.message())
        missing = list(dict.fromkeys(p for p in prompts if self.cache_key(p) not in self._cache))
        fresh = {}
        if missing:
            out = self.encode_uncached(missing, callback)
            fresh = {p: {k: v[i:i + 1] for k, v in out.items()} for i, p in enumerate(missing)}
        rows = [fresh[p] if p in fresh else self._recall(p) for p in prompts]
        for prompt, row in fresh.items():
            self._remember(prompt, row)
        return {k: torch.cat([r[k] for r in rows]) for k in OUTPUT_KEYS}

    def _remember(self, prompt: str, row: dict) -> None:
        """Put one prompt's rows in the LRU, evicting the least recently used beyond ``cache_size``."""
        key = self.cache_key(prompt)
        self._cache[key] = row
        self._cache.move_to_end(key)
        while len(self._cache) > max(self.cache_size, 0):
            self._cache.popitem(last=False)

    def _recall(self, prompt: str) -> dict:
        """One prompt's cached rows (marked as recently used)."""
        key = self.cache_key(prompt)
        self._cache.move_to_end(key)
        return self._cache[key]

    def clear_cache(self) -> None:
        """Forget every cached encoding."""
        self._cache.clear()

    @torch.no_grad()
    def encode_uncached(self, prompts: Sequence[str],
                        callback: Optional[Callable[[int, int], None]] = None) -> dict[str, torch.Tensor]:
        """Run both encoders on ``prompts`` now (no cache); same output as :meth:`encode`.

        Weights released by :meth:`release_weights` are read again first.
        """
        self.load_weights()
        prompts = list(prompts) or [""]
        tokens = self.tokenizer(prompts, self.max_length, warn=False)
        batch, length = tokens.input_ids.shape
        mode = self.plan
        if mode == "auto":
            mode = choose_plan(self.llm, self.device, batch, length, self.free_vram(self.device))
        self.last_plan = mode
        total = len(self.llm.layers) + 1
        on_layer = (lambda i, _n: callback(i, total)) if callback else None
        hidden = run_step_llm(self.llm, tokens.input_ids, self.device, mode, alibi=self.alibi, on_layer=on_layer)
        hidden = hidden.to(self.output_device)

        clip_device = torch.device("cpu") if mode == "cpu" else self.device
        ids, clip_mask = self.clip.tokenize(prompts)
        weights = {f"bert.{k}": v for k, v in on_device(self.clip.bert, clip_device).items()}
        clip_out = functional_call(self.clip, weights, (ids.to(clip_device), clip_mask.to(clip_device)))
        del weights
        if callback:
            callback(total, total)
        mask = F.pad(tokens.attention_mask, (clip_out.shape[1], 0), value=1)
        return {"encoder_hidden_states": hidden.to(self.dtype),
                "encoder_hidden_states_2": clip_out.to(self.output_device).to(self.dtype),
                "encoder_attention_mask": mask.to(self.output_device)}

    def describe(self) -> str:
        """Multi-line summary of what is loaded and how it runs (node UI, logs)."""
        cfg = self.llm.config
        bert = self.clip.bert.config
        params = sum(p.numel() for p in self.llm.parameters())
        attention = "sqrt-ALiBi bias (inferred)" if self.alibi else "plain causal (no bias)"
        where = ("released (read again at the next new prompt)" if self._released
                 else f"on {next(self.llm.parameters()).device}")
        return "\n".join([
            f"Step-LLM: {cfg.num_layers} layers, width {cfg.hidden_size}, {params / 1e9:.2f}B parameters, "
            f"{str(self.dtype).replace('torch.', '')}, attention {attention}",
            f"HunyuanCLIP: {bert.num_hidden_layers} layers, width {bert.hidden_size}, fp32",
            f"weights {where}, compute on {self.device}, plan {self.plan}",
        ])


def _fingerprint(paths: Sequence[Path]) -> str:
    """name:size:mtime of every file, so a re-downloaded model gets a new cache identity."""
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


def text_encoder_files(step_llm_dir: Path, clip_dir: Path) -> list[Path]:
    """Every file the encoders read (weights, configs, tokenizers), for the cache identity."""
    files = [p for p in sorted(step_llm_dir.iterdir()) if p.is_file()]
    for sub in sorted(p for p in clip_dir.iterdir() if p.is_dir()):
        files += [p for p in sorted(sub.iterdir()) if p.is_file()]
    return files


class ClipFolderNotFound(CheckpointError):
    """No ``hunyuan_clip/`` was given and none sits next to ``step_llm/``.

    ``llm_dir`` is the Step-LLM folder it was looked for beside, so a caller with other
    inputs than ``clip_dir`` (the CLI's ``--text-encoders``) can say what to pass instead.
    """

    def __init__(self, message: str, llm_dir: Path):
        super().__init__(message)
        self.llm_dir = llm_dir


def resolve_text_encoder_dirs(step_llm_dir: PathLike, clip_dir: Optional[PathLike] = None) -> tuple[Path, Path]:
    """(step_llm folder, hunyuan_clip folder); without ``clip_dir`` it is looked for next to step_llm.

    Raises :class:`ClipFolderNotFound` when it is not there (a CheckpointError naming ``clip_dir``).
    """
    llm_dir = find_step_llm_dir(step_llm_dir)
    if clip_dir is None:
        candidates = [Path(step_llm_dir) / CLIP_DIR, llm_dir.parent / CLIP_DIR]
        clip_dir = next((c for c in candidates if c.is_dir()), None)
        if clip_dir is None:
            raise ClipFolderNotFound(f"no {CLIP_DIR}/ folder next to {llm_dir}; pass clip_dir (the release's "
                                     f"{CLIP_DIR}/ folder with clip_text_encoder/ and tokenizer/)", llm_dir)
    return llm_dir, find_clip_dir(clip_dir)


def load_text_encoder(step_llm_dir: PathLike, clip_dir: Optional[PathLike] = None,
                      dtype: torch.dtype = torch.bfloat16, device: Union[None, str, torch.device] = None, *,
                      plan: str = "auto", alibi: bool = True, weights_device: Union[str, torch.device] = "cpu",
                      free_vram: Optional[Callable[[torch.device], Optional[int]]] = None,
                      cache_size: int = 16) -> StepVideoTextEncoder:
    """Load Step-LLM (``step_llm/``, or a release root) and HunyuanCLIP (``hunyuan_clip/``).

    Returns a :class:`StepVideoTextEncoder` computing on ``device`` (default:
    CUDA if present) with the Step-LLM in ``dtype`` resting on ``weights_device``
    (CLIP stays fp32).  Files are checked cheapest first (tokenizer, configs,
    CLIP) so a wrong folder fails before 39 GB are read.
    """
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    llm_dir, clip_folder = resolve_text_encoder_dirs(step_llm_dir, clip_dir)
    tokenizer = StepTokenizer(find_tokenizer_file(llm_dir))
    index, config_path = find_step_llm_files(llm_dir)
    config = read_step_llm_config(config_path, index)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise CheckpointError(f"{tokenizer.model_file} has {tokenizer.vocab_size} pieces but {config_path} only "
                              f"{config.padded_vocab_size} embeddings (tokenizer from another model?)")
    clip = load_hunyuan_clip(clip_folder, dtype=torch.float32, device=weights_device)
    llm = load_step_llm(llm_dir, dtype=dtype, device=weights_device, alibi=alibi)

    def reload(encoder: StepVideoTextEncoder) -> None:
        """Fill the released modules again from the same files, in place (same dtypes, same device)."""
        index, _ = find_step_llm_files(llm_dir)
        load_module_weights(encoder.llm, index, dtype=dtype, device=weights_device,
                            what=f"the Step-LLM loaded from {llm_dir}")
        fresh = load_hunyuan_clip(clip_folder, dtype=torch.float32, device=weights_device)
        encoder.clip.bert.load_state_dict(fresh.bert.state_dict(), assign=True)
        encoder.identity = _identity(llm_dir, clip_folder)  # files changed meanwhile: new cache keys

    return StepVideoTextEncoder(llm, tokenizer, clip, device=device, plan=plan, alibi=alibi, free_vram=free_vram,
                                cache_size=cache_size, identity=_identity(llm_dir, clip_folder), reload=reload)


def _identity(llm_dir: Path, clip_folder: Path) -> str:
    """The cache identity of the encoders read from these folders (folders + every file's size and mtime)."""
    return f"{llm_dir}|{clip_folder}|{_fingerprint(text_encoder_files(llm_dir, clip_folder))}"


__all__ = ["ClipFolderNotFound", "MAGIC_PROMPTS", "NEGATIVE_PROMPT", "OUTPUT_KEYS", "POSITIVE_MAGIC",
           "StepVideoTextEncoder", "TI2V_MAGIC", "TI2V_NEGATIVE_PROMPT", "drop_weights", "load_text_encoder",
           "magic_prompts", "resolve_text_encoder_dirs", "with_magic"]
