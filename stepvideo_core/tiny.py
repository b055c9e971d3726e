"""Tiny random models in the exact official file layout.

Used by the CLI's smoke checks (no real weights needed) and by the test suite:
the files have the official key names, shard naming, index json and
config.json, so they go through the very loaders that read the released
checkpoints.  Weights are random but deterministic for a given seed.
"""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from .dit import StepVideoDiTConfig, build_transformer

# Same shape family as the official parity fixture: 2 blocks, 2 heads of 128, LLM width 96, CLIP width 48.
TINY_DIT_CONFIG = dict(num_attention_heads=2, attention_head_dim=128, in_channels=64, out_channels=64,
                       num_layers=2, patch_size=1, norm_eps=1e-6, norm_elementwise_affine=False,
                       use_additional_conditions=False, caption_channels=[96, 48], attention_type="parallel")
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
