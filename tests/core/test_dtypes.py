"""The one dtype-name table and default-dtype rule (stepvideo_core.dtypes) that the CLIs, converters and nodes share."""

from __future__ import annotations

import pytest
import torch

from stepvideo_core import cli, convert, pipeline
from stepvideo_core.dtypes import DTYPE_NAMES, DTYPES, default_dtype, parse_dtype
from stepvideo_core.lora import __main__ as lora_cli
from stepvideo_core.vae import loader as vae_loader


def test_names_and_reverse_map_agree():
    assert DTYPES == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    assert {DTYPES[name]: name for name in DTYPES} == DTYPE_NAMES


def test_every_user_shares_the_table_and_the_rule():
    assert cli.DTYPES is DTYPES and lora_cli.DTYPES is DTYPES and convert.DTYPES is DTYPES
    assert pipeline.DTYPE_NAMES is DTYPE_NAMES
    assert vae_loader.default_dtype is default_dtype


def test_default_follows_the_device():
    assert default_dtype("cuda:1") == torch.bfloat16 and default_dtype(torch.device("cpu")) == torch.float32
    assert parse_dtype("default", "cuda", choices=("default", "fp32")) == torch.bfloat16
    assert parse_dtype("default", "cpu", choices=("default", "fp32")) == torch.float32


def test_parse_names_the_allowed_choices():
    assert parse_dtype("fp16") == torch.float16
    with pytest.raises(ValueError, match=r"unknown VAE weight_dtype 'fp16'; expected one of \['default', 'fp32'\]"):
        parse_dtype("fp16", "cpu", choices=("default", "fp32"), what="VAE weight_dtype")
    with pytest.raises(ValueError, match="unknown dtype 'default'"):
        parse_dtype("default", "cpu")  # "default" is a choice only where the caller offers it
    with pytest.raises(ValueError, match="needs the compute device"):
        parse_dtype("default", choices=("default",))
