"""Step-LLM tokenizer rules: BOS/EOS/PAD/mask, truncation with a warning, the empty list, refusals."""

from __future__ import annotations

import io
import logging

import pytest
import sentencepiece
import torch

from stepvideo_core.checkpoint import CheckpointError
from stepvideo_core.text.tokenizer import BOS, EOS, MAX_LENGTH, PAD, StepTokenizer, find_tokenizer_file

PROMPTS = ["A cat walks along the beach at sunset.", "一只猫在日落时分沿着海滩散步。",
           "A panda 在竹林里 eating bamboo, 高清."]


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return StepTokenizer(tokenizer_file)


def test_rows_are_bos_pieces_eos_then_pad(tok):
    out = tok(PROMPTS)
    assert out.input_ids.shape == out.attention_mask.shape == (3, MAX_LENGTH)
    assert out.input_ids.dtype == out.attention_mask.dtype == torch.long
    assert out.truncated == ()
    for row, mask, text in zip(out.input_ids, out.attention_mask, PROMPTS):
        pieces = tok.sp.encode_as_ids(text)
        n = len(pieces) + 2
        assert pieces and tok.sp.unk_id() not in pieces  # bilingual text encodes without <unk>
        assert row[:n].tolist() == [BOS] + pieces + [EOS]
        assert (row[n:] == PAD).all() and PAD == EOS == 2 and BOS == 1
        assert mask[:n].sum() == n and (mask[n:] == 0).all()


def test_single_string_is_a_batch_of_one(tok):
    assert torch.equal(tok(PROMPTS[0]).input_ids, tok([PROMPTS[0]]).input_ids)


def test_empty_list_gives_one_bos_eos_row(tok):
    out = tok([])
    expected = torch.full((1, MAX_LENGTH), PAD)
    expected[0, 0] = BOS
    assert torch.equal(out.input_ids, expected)
    assert out.attention_mask[0, :2].tolist() == [1, 1] and out.attention_mask[0, 2:].sum() == 0
    assert torch.equal(tok([""]).input_ids, out.input_ids)


def test_long_prompt_is_cut_to_318_pieces_with_a_warning(tok, caplog):
    text = "A cat walks along the beach at sunset, waves rolling in slowly. " * 40
    pieces = tok.sp.encode_as_ids(text)
    assert len(pieces) > MAX_LENGTH
    with caplog.at_level(logging.WARNING, logger="StepVideo"):
        out = tok(["short", text])
    assert out.input_ids[1].tolist() == [BOS] + pieces[:MAX_LENGTH - 2] + [EOS]
    assert out.attention_mask[1].sum() == MAX_LENGTH
    (cut,) = out.truncated
    assert (cut.index, cut.pieces, cut.kept) == (1, len(pieces), MAX_LENGTH - 2)
    assert "prompt 2" in caplog.text and f"{len(pieces) - 318} dropped" in caplog.text


def test_truncation_boundary_and_silent_mode(tok, caplog):
    pieces = tok.sp.encode_as_ids(PROMPTS[0])
    assert tok(PROMPTS[0], max_length=len(pieces) + 2).truncated == ()
    with caplog.at_level(logging.WARNING, logger="StepVideo"):
        out = tok(PROMPTS[0], max_length=len(pieces) + 1, warn=False)
    assert out.truncated[0].kept == len(pieces) - 1 and caplog.text == ""


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="step1_chat_tokenizer.model"):
        find_tokenizer_file(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        StepTokenizer(tmp_path / "step1_chat_tokenizer.model")


def test_non_sentencepiece_file_is_refused(tmp_path):
    bad = tmp_path / "step1_chat_tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        StepTokenizer(bad)


def test_sentencepiece_model_without_the_step_pieces_is_refused(tmp_path):
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(["a cat on the beach"] * 5 + ["猫在海滩上"] * 5),
                                             model_writer=buffer, vocab_size=40, hard_vocab_limit=False,
                                             minloglevel=2, num_threads=1)
    other = tmp_path / "other.model"
    other.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"not the Step-LLM tokenizer.*<\|BOT\|>"):
        StepTokenizer(other)
