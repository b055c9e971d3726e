"""Configuration of the Step-Video DiT, mirroring ``transformer/config.json``.

Field names are exactly the keys of the official diffusers-style config, and
the defaults are the released 30B Step-Video-T2V model (also Turbo).  The
image-to-video model (Step-Video-TI2V) is the same config with
``use_additional_conditions=True``: its patch embed takes the latents and the
image condition concatenated on the channel axis (``2 * in_channels``) and its
AdaLN-single embeds a motion score (reference ``stepvideo-ti2v.md`` section 1).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

# Fixed by the architecture (not stored in config.json): the 3D RoPE splits a
# 128-channel head into [64 (frames), 32 (rows), 32 (columns)].
ROPE_SPLIT = (64, 32, 32)
HEAD_DIM = sum(ROPE_SPLIT)
BLOCK_NORM_EPS = 1e-5      # LayerNorm eps inside blocks (block default, not in config.json)
QK_NORM_EPS = 1e-6         # RMSNorm eps of q/k
TIMESTEP_CHANNELS = 256    # sinusoidal timestep features
TIMESTEP_RESCALE = 1000.0  # sigma in [0, 1) -> [0, 1000)
ROPE_THETA = 1e4

_CONFIG_META_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


class ConfigError(ValueError):
    """config.json (or a config dict) does not describe a usable Step-Video DiT."""


@dataclass
class StepVideoDiTConfig:
    """``StepVideoModel`` constructor arguments; defaults = released 30B model."""

    num_attention_heads: int = 48
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: Optional[int] = 64
    num_layers: int = 48
    dropout: float = 0.0
    patch_size: int = 1
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    use_additional_conditions: bool = False
    caption_channels: Union[int, list] = field(default_factory=lambda: [6144, 1024])
    attention_type: str = "parallel"

    def __post_init__(self) -> None:
        spelled = _spelled_out({"caption_channels": self.caption_channels, "in_channels": self.in_channels,
                                "out_channels": self.out_channels})
        self.caption_channels, self.out_channels = spelled["caption_channels"], spelled["out_channels"]
        problems = []
        if self.attention_head_dim != HEAD_DIM:
            problems.append(f"attention_head_dim must be {HEAD_DIM} (the 3D RoPE split {list(ROPE_SPLIT)} "
                            f"is fixed), got {self.attention_head_dim}")
        for name in ("num_attention_heads", "in_channels", "out_channels", "num_layers", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.use_additional_conditions, bool):
            problems.append(f"use_additional_conditions must be true (Step-Video-TI2V) or false (T2V), "
                            f"got {self.use_additional_conditions!r}")
        cc = self.caption_channels
        if not (isinstance(cc, int) or (isinstance(cc, list) and len(cc) == 2)):
            problems.append(f"caption_channels must be an int or [llm_width, clip_width], got {cc!r}")
        if problems:
            raise ConfigError("invalid Step-Video DiT config: " + "; ".join(problems))

    # -- derived sizes ---------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        """Model width D = heads x head_dim (6144 for the release)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def is_ti2v(self) -> bool:
        """True for Step-Video-TI2V (image-to-video): a first-frame condition and a motion score are inputs."""
        return bool(self.use_additional_conditions)

    @property
    def variant(self) -> str:
        """"Step-Video-TI2V" or "Step-Video-T2V" (Turbo has the T2V architecture), for messages."""
        return "Step-Video-TI2V" if self.is_ti2v else "Step-Video-T2V"

    @property
    def patch_in_channels(self) -> int:
        """Input channels of ``pos_embed.proj``: the latents, plus as many condition channels for TI2V."""
        return self.in_channels * (2 if self.is_ti2v else 1)

    @property
    def caption_dim(self) -> int:
        """Width of the Step-LLM hidden states the caption projection takes."""
        return self.caption_channels if isinstance(self.caption_channels, int) else self.caption_channels[0]

    @property
    def clip_dim(self) -> Optional[int]:
        """Width of the CLIP hidden states, or None when the model has no CLIP projection."""
        return None if isinstance(self.caption_channels, int) else self.caption_channels[1]

    # -- (de)serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        """The config as config.json would store it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "StepVideoDiTConfig":
        """Build from config.json contents; unknown keys are ignored with a warning.

        Raises ConfigError naming ``source`` when the dict is not a Step-Video DiT
        config (for instance a Step-LLM or VAE config put in the wrong folder).
        """
        require_dit_config(data, source)
        known = {f.name for f in dataclasses.fields(cls)}
        keys = set(data) - _CONFIG_META_KEYS
        unknown = sorted(keys - known)
        if unknown:
            warnings.warn(f"{source}: ignoring keys not used by the Step-Video DiT: {unknown}", stacklevel=2)
        return cls(**{k: data[k] for k in keys & known})

    @classmethod
    def stated_fields(cls, data: Mapping[str, Any]) -> dict:
        """Every field as config.json ``data`` states it (defaults for the absent ones), *not* validated.

        Exists so that the loader can compare config.json with the weights before validating
        it: a wrong value then reads "config.json says 64, the weights have 128" instead of
        a complaint about a value the weights never had.
        """
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = data[f.name]
            else:
                values[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        return _spelled_out(values)


def require_dit_config(data: Any, source: str = "config") -> None:
    """Raise ConfigError naming ``source`` unless ``data`` looks like a Step-Video DiT config.json.

    Exists so that a Step-LLM or VAE config put in the wrong folder is named as such
    before any of its fields is compared or validated.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} does not describe a Step-Video DiT (StepVideoModel): it holds a "
                          f"{type(data).__name__}, not an object of config fields")
    keys = set(data) - _CONFIG_META_KEYS
    if data.get("_class_name") not in (None, "StepVideoModel") or not keys & {"num_attention_heads", "num_layers",
                                                                            "caption_channels"}:
        raise ConfigError(f"{source} does not describe a Step-Video DiT (StepVideoModel): "
                          f"{_describe_foreign_config(data)}")


def _spelled_out(fields: Mapping[str, Any]) -> dict:
    """``fields`` with config.json's shorthands spelled out: caption_channels as a list, out_channels None =
    in_channels (the one place these rules live: the dataclass and the loader's comparison both use it)."""
    out = dict(fields)
    if isinstance(out.get("caption_channels"), tuple):
        out["caption_channels"] = list(out["caption_channels"])
    if out.get("out_channels") is None:
        out["out_channels"] = out.get("in_channels")
    return out


def _describe_foreign_config(data: Mapping[str, Any]) -> str:
    """A short guess of what a foreign config.json belongs to, for error messages."""
    arch = data.get("architectures") or [data.get("_class_name")]
    if "num_attention_groups" in data or arch == ["Step1Model"]:
        return "it looks like the Step-LLM text encoder config (step_llm/config.json)"
    if data.get("model_type") == "bert" or "BertModel" in (arch or []):
        return "it looks like the HunyuanCLIP (BERT) text encoder config"
    if "z_channels" in data or "latent_channels" in data:
        return "it looks like a VAE config"
    shown = sorted(k for k in data)[:8]
    return f"found keys {shown} (class {data.get('_class_name')!r})"
