"""Step-LLM tokenizer: SentencePiece ``step1_chat_tokenizer.model`` with the official padding rules.

Rules (reference §4.1, the caption server's tokenizer wrapper):

* ids = [BOS=1] + pieces[:318] + [EOS=2], right-padded with PAD=2 to 320;
* attention mask 1 for BOS..EOS, 0 for the pads;
* an empty prompt *list* gives one row [1, 2, pad...] (official behaviour);
* the pieces come from a plain ``encode_as_ids`` call, no chat template.

The one deliberate difference: a prompt longer than 318 pieces is still cut
(as the official code does) but never silently - the cut is returned in
:attr:`TokenizedPrompts.truncated` and logged as a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from ..checkpoint import CheckpointError, PathLike

log = logging.getLogger("StepVideo")

TOKENIZER_FILE = "step1_chat_tokenizer.model"
MAX_LENGTH = 320
BOS, EOS, PAD = 1, 2, 2
# Pieces the official tokenizer class insists on: control symbols (special tokens) ...
CONTROL_PIECES = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
# ... and pieces that must merely exist.
OTHER_PIECES = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


@dataclass(frozen=True)
class Truncation:
    """One prompt cut to fit: row ``index`` had ``pieces`` pieces, ``kept`` of them were kept."""

    index: int
    pieces: int
    kept: int

    def message(self, what: str = "Step-LLM") -> str:
        """A one-line warning for logs and the node UI."""
        return (f"{what}: prompt {self.index + 1} is {self.pieces} tokens long; only the first {self.kept} "
                f"are used ({self.pieces - self.kept} dropped). Shorten the prompt to keep all of it.")


@dataclass(frozen=True)
class TokenizedPrompts:
    """``input_ids`` and ``attention_mask`` (both int64 [B, max_length]) plus what had to be cut."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: tuple = ()


class StepTokenizer:
    """The Step-LLM SentencePiece tokenizer; call it on a list of prompts.

    Exists so the padding/truncation rules live in one place and are testable
    without any model weights.
    """

    def __init__(self, model_file: PathLike):
        import sentencepiece

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise CheckpointError(f"Step-LLM tokenizer file not found: {self.model_file} (the release ships it as "
                                  f"step_llm/{TOKENIZER_FILE}; put it next to the step_llm weights)")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(f"{self.model_file} is not a SentencePiece model ({exc}); expected "
                                  f"{TOKENIZER_FILE} of the step_llm release folder") from exc
        self._check_special_pieces()

    def _check_special_pieces(self) -> None:
        """Refuse a SentencePiece model that is not the Step chat tokenizer (the official class asserts the same)."""
        absent = [p for p in CONTROL_PIECES + OTHER_PIECES if self.sp.piece_to_id(p) == self.sp.unk_id()]
        not_control = [p for p in CONTROL_PIECES if p not in absent and not self.sp.is_control(self.sp.piece_to_id(p))]
        if absent or not_control:
            problems = ([f"missing pieces {absent}"] if absent else []) + (
                [f"pieces that should be control symbols but are not: {not_control}"] if not_control else [])
            raise CheckpointError(f"{self.model_file} is a SentencePiece model but not the Step-LLM tokenizer "
                                  f"({'; '.join(problems)}); expected {TOKENIZER_FILE} of the step_llm folder")

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the SentencePiece model (the LLM's embedding table may be larger)."""
        return self.sp.get_piece_size()

    def pieces(self, text: str) -> list[int]:
        """Piece ids of ``text`` without BOS/EOS (the official ``encode_as_ids``)."""
        return self.sp.encode_as_ids(text)

    def __call__(self, prompts: Union[str, Sequence[str]], max_length: int = MAX_LENGTH,
                 warn: bool = True) -> TokenizedPrompts:
        """Tokenize ``prompts`` into fixed-length rows; see the module docstring for the rules.

        Each cut prompt is logged as a warning unless ``warn`` is False (the
        caller then reports :attr:`TokenizedPrompts.truncated` itself).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        rows = [self.pieces(p) for p in prompts] if len(prompts) else [[]]
        ids = torch.full((len(rows), max_length), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), max_length), dtype=torch.long)
        truncated = []
        for i, pieces in enumerate(rows):
            kept = pieces[:max_length - 2]
            if len(kept) < len(pieces):
                truncated.append(Truncation(i, len(pieces), len(kept)))
            row = [BOS] + kept + [EOS]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        for cut in truncated if warn else ():
            log.warning("StepVideo: %s", cut.message())
        return TokenizedPrompts(ids, mask, tuple(truncated))


def find_tokenizer_file(step_llm_dir: PathLike) -> Path:
    """``step1_chat_tokenizer.model`` inside ``step_llm_dir``; CheckpointError naming it when absent."""
    folder = Path(step_llm_dir)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
        raise CheckpointError(f"the Step-LLM tokenizer {TOKENIZER_FILE} is missing from {folder} (found {found}). "
                              f"Download step_llm/{TOKENIZER_FILE} from stepfun-ai/stepvideo-t2v into that folder.")
    return path
