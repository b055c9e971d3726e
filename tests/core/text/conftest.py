"""Tiny text encoders in the release layout, written once per test session.

Tests that modify files copy them first (``copy_tree``); the shared folders stay pristine.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from stepvideo_core.text import load_text_encoder
from tests.factory import train_tiny_step_tokenizer, write_tiny_text_encoders


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A tiny Step-style SentencePiece model (trained once per session)."""
    return train_tiny_step_tokenizer(tmp_path_factory.mktemp("tok") / "step1_chat_tokenizer.model")


@pytest.fixture(scope="session")
def release_root(tmp_path_factory):
    """``<root>/step_llm`` (2 shards, bf16) and ``<root>/hunyuan_clip`` (safetensors) - treat as read-only."""
    return write_tiny_text_encoders(tmp_path_factory.mktemp("stepvideo-t2v"))


@pytest.fixture(scope="session")
def encoder(release_root):
    """The tiny encoders loaded in fp32 on the CPU (shared; tests must not change its settings)."""
    return load_text_encoder(release_root, dtype=torch.float32, device="cpu")


@pytest.fixture
def copy_tree(tmp_path):
    """copy_tree(src) -> a private copy of folder ``src`` under tmp_path, free to break."""
    def copy(src):
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return copy
