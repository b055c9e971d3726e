"""Tiny random models in the exact official file layout.

Used by the CLI's smoke checks (no real weights needed) and by the test suite:
the files have the official key names, shard naming, index json and
config.json, so they go through the very loaders that read the released
checkpoints.  Weights are random but deterministic for a given seed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import torch
from filelock import FileLock
from safetensors.torch import save_file

from .dit import StepVideoDiTConfig, build_transformer

# Same shape family as the official parity fixture: 2 blocks, 2 heads of 128, LLM width 96, CLIP width 48.
TINY_DIT_CONFIG = dict(num_attention_heads=2, attention_head_dim=128, in_channels=64, out_channels=64,
                       num_layers=2, patch_size=1, norm_eps=1e-6, norm_elementwise_affine=False,
                       use_additional_conditions=False, caption_channels=[96, 48], attention_type="parallel")
# The image-to-video variant of the same tiny DiT (Step-Video-TI2V: 2 x 64-channel patch embed, motion-score embedder).
TINY_TI2V_DIT_CONFIG = dict(TINY_DIT_CONFIG, use_additional_conditions=True)
DIT_WEIGHTS = "diffusion_pytorch_model"


def random_state_dict(shapes: Mapping[str, tuple], seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights for ``shapes``, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        r = torch.randn(shape, generator=gen)
        if "norm" in name and name.endswith(".weight") and len(shape) == 1:
            value = 1.0 + 0.1 * r
        elif len(shape) == 1:
            value = 0.05 * r
        elif "scale_shift_table" in name:
            value = r / math.sqrt(shape[-1])
        else:
            value = r / math.sqrt(math.prod(shape[1:]))
        out[name] = value.to(dtype).contiguous()
    return out


def tiny_dit_state_dict(config: Optional[Mapping] = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random DiT weights under the official checkpoint names for ``config`` (default tiny)."""
    model = build_transformer(dict(config or TINY_DIT_CONFIG), device="meta")
    return random_state_dict({k: v.shape for k, v in model.state_dict().items()}, seed, dtype)


def write_sharded(state_dict: Mapping[str, torch.Tensor], folder: Path, stem: str, shards: int = 2) -> list[Path]:
    """Write ``<stem>-0000k-of-0000n.safetensors`` shards + ``<stem>.safetensors.index.json`` (HF layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state_dict)
    shards = max(1, min(shards, len(names)))
    per = math.ceil(len(names) / shards)
    weight_map, files, total = {}, [], 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state_dict[k].contiguous() for k in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
        total += sum(state_dict[k].numel() * state_dict[k].element_size() for k in part)
        files.append(folder / file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def dit_config_json(config: Mapping) -> dict:
    """config.json contents as diffusers writes them for the official StepVideoModel."""
    data = {"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0"}
    data.update(StepVideoDiTConfig.from_dict(dict(config)).to_dict())
    return data


def write_dit_checkpoint(state_dict: Mapping[str, torch.Tensor], config: Mapping, directory: Path,
                         layout: str = "official", prefix: str = "", shards: int = 2) -> Path:
    """Write DiT weights in one of the layouts users have; returns the path to hand to the loader.

    layout "official": ``<dir>/model_index.json`` + ``<dir>/transformer/{config.json, shards, index}``
    (returns ``<dir>``); "transformer": the transformer folder itself (returns it);
    "single": ``<dir>/stepvideo_dit.safetensors`` with keys prefixed by ``prefix`` (returns the file).
    """
    directory = Path(directory)
    if layout == "single":
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "stepvideo_dit.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in state_dict.items()}, str(path))
        return path
    if layout not in ("official", "transformer"):
        raise ValueError(f"layout must be 'official', 'transformer' or 'single', got {layout!r}")
    folder = directory / "transformer" if layout == "official" else directory
    write_sharded({prefix + k: v for k, v in state_dict.items()}, folder, DIT_WEIGHTS, shards)
    (folder / "config.json").write_text(json.dumps(dit_config_json(config), indent=2))
    if layout == "official":
        (directory / "model_index.json").write_text(json.dumps({
            "_class_name": "StepVideoPipeline", "_diffusers_version": "0.31.0",
            "scheduler": ["stepvideo", "FlowMatchDiscreteScheduler"],
            "transformer": ["stepvideo", "StepVideoModel"]}, indent=2))
        return directory
    return folder


def write_tiny_dit(directory, layout: str = "official", seed: int = 0, prefix: str = "",
                   config: Optional[Mapping] = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny random DiT written in ``layout`` (see :func:`write_dit_checkpoint`); bf16 on disk like the release."""
    config = dict(config or TINY_DIT_CONFIG)
    return write_dit_checkpoint(tiny_dit_state_dict(config, seed, dtype), config, Path(directory), layout, prefix)


# --------------------------------------------------------------------------- text encoders

# Widths fit the tiny DiT's caption_channels [96, 48]: Step-LLM hidden 96, CLIP hidden 48.
TINY_LLM_CONFIG = dict(hidden_size=96, num_layers=2, num_attention_heads=4, num_attention_groups=2,
                       ffn_hidden_size=160, padded_vocab_size=512, seq_length=1024)
TINY_CLIP_CONFIG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                        max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
# Bilingual text the tiny tokenizers are built from (English, Chinese, mixed, the official magic strings).
TINY_TEXT_CORPUS = (
    "A cat walks along the beach at sunset, waves rolling in slowly.",
    "An astronaut rides a white horse across the surface of the moon.",
    "A red car drives through a city street at night in the rain.",
    "Close-up of a woman smiling, soft light, 4K, cinematic.",
    "一只猫在日落时分沿着海滩散步，海浪缓缓涌来。",
    "宇航员骑着一匹白马穿过月球表面。",
    "夜晚的雨中，一辆红色的汽车驶过城市街道。",
    "一个女孩在花园里跳舞，阳光明媚，镜头缓慢推进。",
    "A panda 在竹林里 eating bamboo, 高清, slow motion.",
    "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。",
    "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。",
    "0123456789 ,.;:!?'\"()[]-_/",
)
STEP_TOKENIZER_CONTROL = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
STEP_TOKENIZER_USER = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_bytes(corpus: tuple, vocab_size: int) -> bytes:
    """A SentencePiece model trained on ``corpus`` (cached per process: training is deterministic)."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 3), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, control_symbols=list(STEP_TOKENIZER_CONTROL), user_defined_symbols=list(STEP_TOKENIZER_USER),
        num_threads=1, minloglevel=2)
    return buffer.getvalue()


def train_tiny_step_tokenizer(path, corpus=TINY_TEXT_CORPUS, vocab_size: int = 500) -> Path:
    """Write a tiny Step-style SentencePiece tokenizer to ``path``; returns the path.

    Same conventions as ``step1_chat_tokenizer.model``: unk 0, BOS 1, EOS 2, the
    special pieces the official tokenizer class requires (control symbols
    ``<|BOT|>`` ... ``<|THINK_END|>``, user symbols ``<|MASK_1e69f|>``/``<|UNMASK_1e69f|>``),
    byte fallback so any text encodes.  ``vocab_size`` must stay within the LLM's
    ``padded_vocab_size`` (512 in :data:`TINY_LLM_CONFIG`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tiny_tokenizer_bytes(tuple(corpus), vocab_size))
    return path


def step_llm_config_json(config: Mapping) -> dict:
    """``step_llm/config.json`` contents in the release's form for ``config``."""
    from .text.step_llm import StepLLMConfig

    data = {"architectures": ["Step1Model"], "torch_dtype": "bfloat16"}
    data.update(StepLLMConfig.from_dict(dict(config)).to_dict())
    return data


def tiny_step_llm_state_dict(config: Optional[Mapping] = None, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random Step-LLM weights under the official checkpoint names for ``config`` (default tiny)."""
    from .text.step_llm import build_step_llm

    model = build_step_llm(dict(config or TINY_LLM_CONFIG), device="meta")
    return random_state_dict({k: v.shape for k, v in model.state_dict().items()}, seed, dtype)


def write_tiny_step_llm(directory, seed: int = 0, config: Optional[Mapping] = None,
                        dtype: torch.dtype = torch.bfloat16, shards: int = 2, tokenizer: bool = True) -> Path:
    """A tiny random ``step_llm/`` folder in the release layout; returns the folder.

    ``config.json``, ``model-0000k-of-0000n.safetensors`` shards + ``model.safetensors.index.json``
    (bf16 on disk like the release) and, unless ``tokenizer`` is False, a tiny
    ``step1_chat_tokenizer.model``.
    """
    config = dict(config or TINY_LLM_CONFIG)
    folder = Path(directory)
    write_sharded(tiny_step_llm_state_dict(config, seed, dtype), folder, "model", shards)
    (folder / "config.json").write_text(json.dumps(step_llm_config_json(config), indent=2))
    if tokenizer:
        train_tiny_step_tokenizer(folder / "step1_chat_tokenizer.model")
    return folder


def tiny_clip_vocab(corpus=TINY_TEXT_CORPUS) -> list[str]:
    """A BertTokenizer vocabulary covering ``corpus``: specials, every character, words, ``##`` pieces."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    text = " ".join(corpus).lower()
    chars = sorted({c for c in text if not c.isspace()})
    words = sorted({w.strip(".,;:!?'\"()[]-_/，。、") for w in text.split() if w.isascii()} - {""})
    pieces = sorted({"##" + c for c in chars if c.isascii() and c.isalnum()})
    vocab = specials + chars + [w for w in words if w not in chars] + pieces
    return list(dict.fromkeys(vocab))


def write_tiny_hunyuan_clip(directory, seed: int = 0, config: Optional[Mapping] = None,
                            weights: str = "safetensors") -> Path:
    """A tiny random ``hunyuan_clip/`` folder in the release layout; returns the folder.

    ``clip_text_encoder/`` holds a transformers BertModel ``config.json`` and its
    weights as ``model.safetensors`` (``weights="safetensors"``), as
    ``pytorch_model.bin`` written by ``torch.save`` like the release (``"bin"``,
    with the legacy ``embeddings.position_ids`` entry old transformers saved), or
    both (``"both"``).  ``tokenizer/`` holds a ``vocab.txt`` for BertTokenizer.
    """
    from transformers import BertConfig, BertModel

    if weights not in ("safetensors", "bin", "both"):
        raise ValueError(f"weights must be 'safetensors', 'bin' or 'both', got {weights!r}")
    folder = Path(directory)
    encoder_dir, tokenizer_dir = folder / "clip_text_encoder", folder / "tokenizer"
    encoder_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab = tiny_clip_vocab()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, indent=2))
    bert_config = BertConfig(vocab_size=len(vocab), **dict(config or TINY_CLIP_CONFIG))
    bert_config.architectures = ["BertModel"]
    bert_config.to_json_file(str(encoder_dir / "config.json"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(bert_config)  # transformers' own init (keeps LayerNorms near identity)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if weights in ("safetensors", "both"):
        save_file(state, str(encoder_dir / "model.safetensors"), metadata={"format": "pt"})
    if weights in ("bin", "both"):
        legacy = dict(state)
        legacy["embeddings.position_ids"] = torch.arange(bert_config.max_position_embeddings).unsqueeze(0)
        torch.save(legacy, encoder_dir / "pytorch_model.bin")
    return folder


def write_tiny_text_encoders(directory, seed: int = 0, clip_weights: str = "safetensors") -> Path:
    """``<directory>/step_llm/`` and ``<directory>/hunyuan_clip/`` as in the release root; returns ``directory``."""
    directory = Path(directory)
    write_tiny_step_llm(directory / "step_llm", seed=seed)
    write_tiny_hunyuan_clip(directory / "hunyuan_clip", seed=seed, weights=clip_weights)
    return directory



# --------------------------------------------------------------------------- VAE

# Same shape family as the official VAE parity fixture (tests/fixtures/stepvideo_vae_tiny.safetensors).
TINY_VAE_CONFIG = dict(z_channels=8, enc_ch=32, enc_ch_mult=(1, 1, 1, 1), dec_ch=32, dec_ch_mult=(1, 1, 1, 1),
                       num_res_blocks=2)


def tiny_vae_state_dict(config: Optional[Mapping] = None, seed: int = 0,
                        dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Random VAE v2 weights under the *on-disk* names of ``vae_v2.safetensors`` (default: tiny config)."""
    from .vae import build_vae
    from .vae.loader import to_disk_name

    model = build_vae(dict(TINY_VAE_CONFIG) if config is None else config, device="meta")
    shapes = {to_disk_name(k): v.shape for k, v in model.state_dict().items()}
    return random_state_dict(shapes, seed, dtype or torch.float32)


def write_tiny_vae(directory, seed: int = 0, config: Optional[Mapping] = None, layout: str = "official",
                   prefix: str = "", state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """A tiny random VAE v2 file (fp32 like the release); returns its path.

    layout "official": ``<dir>/vae/vae_v2.safetensors``; "single": ``<dir>/stepvideo_vae.safetensors``.
    Keys get ``prefix`` (e.g. ``"vae."``); ``state_dict`` (on-disk names) replaces the random weights.
    """
    weights = tiny_vae_state_dict(config, seed) if state_dict is None else state_dict
    directory = Path(directory)
    if layout == "official":
        path = directory / "vae" / "vae_v2.safetensors"
    elif layout == "single":
        path = directory / "stepvideo_vae.safetensors"
    else:
        raise ValueError(f"layout must be 'official' or 'single', got {layout!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


# --------------------------------------------------------------------------- a whole tiny release

# A tiny stepvideo-t2v whose parts fit together: the DiT's latent channels are the VAE's z
# channels, its caption_channels [96, 48] the Step-LLM and CLIP widths above.
TINY_RELEASE_DIT_CONFIG = dict(TINY_DIT_CONFIG, in_channels=TINY_VAE_CONFIG["z_channels"],
                               out_channels=TINY_VAE_CONFIG["z_channels"])
# The tiny release's image-to-video transformer (same encoders and VAE, as in the stepvideo-ti2v release).
TINY_RELEASE_TI2V_DIT_CONFIG = dict(TINY_RELEASE_DIT_CONFIG, use_additional_conditions=True)
# Bump when the files write_tiny_release produces change for the same configs (invalidates caches).
TINY_RELEASE_FORMAT = 2
RELEASE_DIR = "stepvideo-t2v"
# Beside transformer/ in the tiny release: a tiny Step-Video-TI2V transformer folder (config.json + shards).
TI2V_TRANSFORMER_DIR = "transformer-ti2v"
CACHE_ENV = "STEPVIDEO_CACHE"
_COMPLETE = "tiny-release.json"


def tiny_release_key(seed: int = 0) -> str:
    """Short hash naming one tiny release: configs, tokenizer corpus, seed and file format version."""
    spec = dict(format=TINY_RELEASE_FORMAT, seed=seed, dit=TINY_RELEASE_DIT_CONFIG, ti2v=TINY_RELEASE_TI2V_DIT_CONFIG,
                vae=TINY_VAE_CONFIG, llm=TINY_LLM_CONFIG, clip=TINY_CLIP_CONFIG, corpus=TINY_TEXT_CORPUS,
                torch=torch.__version__)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]


def write_tiny_release(directory, seed: int = 0) -> Path:
    """A complete tiny ``stepvideo-t2v`` release in ``directory``; returns ``directory``.

    The official layout: ``transformer/`` (config.json + shards + index), ``vae/vae_v2.safetensors``,
    ``step_llm/`` and ``hunyuan_clip/``, mutually consistent (see :data:`TINY_RELEASE_DIT_CONFIG`),
    plus ``transformer-ti2v/``: a tiny Step-Video-TI2V transformer in the same layout, for
    image-to-video with the same encoders and VAE (:func:`tiny_ti2v_transformer`).
    Random weights: every loader and the whole pipeline run on it, the video is noise.
    """
    directory = Path(directory)
    write_tiny_dit(directory, layout="official", seed=seed, config=TINY_RELEASE_DIT_CONFIG)
    write_tiny_dit(directory / TI2V_TRANSFORMER_DIR, layout="transformer", seed=seed,
                   config=TINY_RELEASE_TI2V_DIT_CONFIG)
    write_tiny_vae(directory, seed=seed)
    write_tiny_text_encoders(directory, seed=seed)
    return directory


def tiny_ti2v_transformer(release: Path) -> Path:
    """The tiny Step-Video-TI2V transformer folder of a tiny release written by :func:`write_tiny_release`."""
    return Path(release) / TI2V_TRANSFORMER_DIR


def write_tiny_image(path, width: int = 80, height: int = 48, seed: int = 0) -> Path:
    """A small RGB PNG to condition image-to-video smoke runs with; returns its path.

    A colour gradient with a bright disc whose place depends on ``seed`` (so a crop or a
    colour-channel mix-up changes what the VAE sees).  Written with Pillow, deterministic.
    """
    import numpy as np
    from PIL import Image

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
    disc = ((ys - cy) ** 2 + (xs - cx) ** 2) <= (min(width, height) / 5) ** 2
    rgb = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1), 1 - xs / max(width - 1, 1)], axis=-1)
    rgb[disc] = (1.0, 0.9, 0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB").save(path)
    return path


def default_cache_dir() -> Path:
    """Where cached tiny releases live: ``$STEPVIDEO_CACHE``, else ``~/.cache/stepvideo``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stepvideo"


def _complete(release_root: Path) -> bool:
    """True when ``release_root`` (``<cache>/tiny-<key>``) holds a whole tiny release (its marker is written last)."""
    return (release_root / _COMPLETE).is_file()


def cached_tiny_release(cache_dir=None, seed: int = 0) -> tuple[Path, bool]:
    """The tiny release under ``<cache>/tiny-<key>/stepvideo-t2v``, written on first use; returns (path, created).

    Exists so the CLI runs with no model download.  The files are written into a
    temporary folder next to the final one and renamed into place once complete,
    so an interrupted first run never leaves a half-written release.  Concurrent
    first runs (two torchrun ranks, two test workers) take turns under a lock file
    in the cache folder: the second finds the first's release and uses it, and never
    removes a release another process may be reading.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = tiny_release_key(seed)
    final = cache / f"tiny-{key}"
    if _complete(final):
        return final / RELEASE_DIR, False
    cache.mkdir(parents=True, exist_ok=True)
    # filelock (a dependency of torch, so always there): a portable lock file instead of fcntl/msvcrt by hand
    with FileLock(str(cache / f".tiny-{key}.lock")):
        if _complete(final):  # another process wrote it while this one waited
            return final / RELEASE_DIR, False
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache))
        try:
            write_tiny_release(tmp / RELEASE_DIR, seed=seed)
            (tmp / _COMPLETE).write_text(json.dumps({"key": key, "seed": seed,
                                                     "note": "tiny random Step-Video-T2V (and TI2V transformer) "
                                                             "for smoke tests"}, indent=2))
            if final.exists():  # a leftover without the marker: an older, interrupted or foreign writer's
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / RELEASE_DIR, True


# --------------------------------------------------------------------------- LoRA adapters

# How trainers name the layers of block N; "official" = our module names (fused q/k/v).
# Each style maps a role to the trainer's name: the self-/cross-attention modules and q/k/v/out projections.
TINY_LORA_STYLES = {
    "official": dict(block="transformer_blocks", self="attn1", cross="attn2", q=None, k=None, v=None, o="wo"),
    "diffusers": dict(block="transformer_blocks", self="attn1", cross="attn2", q="to_q", k="to_k", v="to_v",
                      o="to_out.0"),
    "proj": dict(block="blocks", self="self_attn", cross="cross_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj"),
    "w": dict(block="transformer_blocks", self="attn", cross="attn_2", q="wq", k="wk", v="wv", o="wo"),
}
# Layers outside the blocks that every tiny adapter also changes (official names in every style).
TINY_LORA_EXTRA = ("proj_out", "adaln_single.linear", "caption_projection.linear_1", "clip_projection",
                   "adaln_single.emb.timestep_embedder.linear_1")
LORA_KEY_FORMATS = ("peft", "kohya", "comfy")


def tiny_lora_layers(config: Optional[Mapping] = None, style: str = "diffusers") -> list[tuple]:
    """(trainer module name, official module, row part) for every layer a tiny adapter of ``style`` changes.

    ``row part`` is None for a whole layer, else ``(index, parts)``: the q/k/v part of a
    head-interleaved fused projection (self-attention wqkv: q 0, k 1, v 2 of 3; cross-attention
    wkv: k 0, v 1 of 2), as reference section 2.3 lays them out.
    """
    config = dict(config or TINY_DIT_CONFIG)
    names = TINY_LORA_STYLES[style]
    out = []
    for n in range(config["num_layers"]):
        ours = f"transformer_blocks.{n}"
        theirs = f"{names['block']}.{n}"
        sa, ca = f"{theirs}.{names['self']}", f"{theirs}.{names['cross']}"
        if names["q"] is None:
            out += [(f"{sa}.wqkv", f"{ours}.attn1.wqkv", None), (f"{ca}.wq", f"{ours}.attn2.wq", None),
                    (f"{ca}.wkv", f"{ours}.attn2.wkv", None)]
        else:
            out += [(f"{sa}.{names[p]}", f"{ours}.attn1.wqkv", (i, 3)) for i, p in enumerate("qkv")]
            out += [(f"{ca}.{names['q']}", f"{ours}.attn2.wq", None)]
            out += [(f"{ca}.{names[p]}", f"{ours}.attn2.wkv", (i, 2)) for i, p in enumerate("kv")]
        out += [(f"{sa}.{names['o']}", f"{ours}.attn1.wo", None), (f"{ca}.{names['o']}", f"{ours}.attn2.wo", None),
                (f"{theirs}.ff.net.0.proj", f"{ours}.ff.net.0.proj", None),
                (f"{theirs}.ff.net.2", f"{ours}.ff.net.2", None)]
    out += [(name, name, None) for name in TINY_LORA_EXTRA]
    return out


def tiny_lora(config: Optional[Mapping] = None, style: str = "diffusers", keys: str = "peft", rank: int = 4,
              alpha: Optional[float] = None, seed: int = 0, prefix: str = "",
              dtype: torch.dtype = torch.float32) -> tuple[dict, list[dict]]:
    """A random LoRA for the tiny DiT: (state dict in the ``keys`` format, truth).

    ``keys``: "peft" (``<prefix><module>.lora_A.weight`` / ``lora_B``; alpha lives in
    adapter_config.json, see :func:`write_tiny_lora`), "kohya" (``lora_unet_<module with
    underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``) or "comfy" (``<prefix><module>.lora_down.weight``
    / ``lora_up`` / ``alpha``).  ``truth`` has one dict per layer: official ``module``,
    ``part`` (see :func:`tiny_lora_layers`), ``down`` [r, in], ``up`` [rows, r] (fp32) and
    ``scale`` (alpha / rank, 1 without alpha) -- what a correct loader must add.
    """
    if keys not in LORA_KEY_FORMATS:
        raise ValueError(f"keys must be one of {LORA_KEY_FORMATS}, got {keys!r}")
    config = dict(config or TINY_DIT_CONFIG)
    shapes = {k[:-len(".weight")]: tuple(v.shape) for k, v in build_transformer(config, device="meta").state_dict().items()
              if k.endswith(".weight")}
    gen = torch.Generator().manual_seed(seed)
    state, truth = {}, []
    for name, module, part in tiny_lora_layers(config, style):
        rows, cols = shapes[module]
        if part is not None:
            rows //= part[1]
        down = (torch.randn(rank, cols, generator=gen) / cols ** 0.5).to(dtype)
        up = (torch.randn(rows, rank, generator=gen) * 0.05).to(dtype)
        scale = 1.0 if alpha is None else alpha / rank
        truth.append(dict(module=module, part=part, down=down.float(), up=up.float(), scale=scale))
        if keys == "peft":
            state[f"{prefix}{name}.lora_A.weight"] = down
            state[f"{prefix}{name}.lora_B.weight"] = up
            continue
        stem = "lora_unet_" + name.replace(".", "_") if keys == "kohya" else prefix + name
        state[f"{stem}.lora_down.weight"] = down
        state[f"{stem}.lora_up.weight"] = up
        if alpha is not None:
            state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return state, truth


def write_tiny_lora(path, **kwargs) -> tuple[Path, list[dict]]:
    """Write :func:`tiny_lora` to disk; returns (path to give the loader, truth).

    "peft" keys with an ``alpha`` become a PEFT folder (``path`` is then a folder holding
    ``adapter_model.safetensors`` + ``adapter_config.json`` with ``r`` and ``lora_alpha``);
    everything else one .safetensors file at ``path``.
    """
    state, truth = tiny_lora(**kwargs)
    path = Path(path)
    if kwargs.get("keys", "peft") == "peft" and kwargs.get("alpha") is not None:
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": kwargs.get("rank", 4), "lora_alpha": kwargs["alpha"],
             "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _, _ in
                                       tiny_lora_layers(kwargs.get("config"), kwargs.get("style", "diffusers"))})},
            indent=2))
        return path, truth
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path, truth
