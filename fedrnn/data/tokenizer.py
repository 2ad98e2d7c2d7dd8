"""Subword tokenizer (Hugging Face ``tokenizers`` BPE) trained on IMDB train, saved with the model.

Reviews are encoded to fixed-width int32 id matrices plus true lengths, which is what the
packed-sequence LSTM and the on-disk client caches want.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID = 0


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable."""


def train_tokenizer(texts: Sequence[str], vocab_size: int = 16000, min_frequency: int = 2) -> Tokenizer:
    """Train a lower-cased byte-pair-encoding tokenizer; id 0 is padding, 1 is unknown."""
    if vocab_size < 100:
        raise ValueError(f"vocab_size must be >= 100, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike[str]) -> None:
    tok.save(str(path))


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"tokenizer file {p} does not exist")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises plain Exception on bad JSON
        raise TokenizerError(f"{p}: not a valid tokenizer file ({e})") from e
    if tok.token_to_id(PAD) != PAD_ID:
        raise TokenizerError(f"{p}: token id {PAD_ID} is not {PAD}; not a fedrnn tokenizer")
    return tok


@dataclass
class Encoded:
    """Token ids (right-padded with PAD_ID), true lengths and labels of a set of reviews."""

    ids: np.ndarray  # int32 [N, max_len]
    lengths: np.ndarray  # int64 [N], >= 1
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, index: np.ndarray) -> Encoded:
        return Encoded(self.ids[index], self.lengths[index], self.labels[index])


def encode(tok: Tokenizer, texts: Sequence[str], labels: np.ndarray, max_len: int) -> Encoded:
    """Encode texts, keeping the *last* ``max_len`` tokens: reviews tend to end on their verdict."""
    ids = np.full((len(texts), max_len), PAD_ID, dtype=np.int32)
    lengths = np.ones(len(texts), dtype=np.int64)
    for i, enc in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
        seq = enc.ids[-max_len:]
        if seq:
            ids[i, : len(seq)] = seq
            lengths[i] = len(seq)
        else:  # an empty review still needs one step for the LSTM: use UNK
            ids[i, 0] = 1
    return Encoded(ids, lengths, np.asarray(labels, dtype=np.int64))
