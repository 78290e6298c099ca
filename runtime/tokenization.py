"""Tokenization with the `tokenizers` library from the bundle's tokenizer.json (no transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError, InputError

PAD_TOKEN_CANDIDATES = ("[PAD]", "<pad>", "<PAD>")


@dataclass
class EncodedBatch:
    """Token arrays padded to the batch's own longest row."""

    input_ids: np.ndarray  # int64 [n, longest]
    attention_mask: np.ndarray  # int64 [n, longest]
    token_type_ids: np.ndarray  # int64 [n, longest]
    truncated: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows) -> "EncodedBatch":
        """Rows `rows`, re-padded to their own longest sequence."""
        longest = max(1, int(self.attention_mask[rows].sum(axis=1).max()))
        return EncodedBatch(
            self.input_ids[rows, :longest], self.attention_mask[rows, :longest],
            self.token_type_ids[rows, :longest], self.truncated[rows],
        )


def pad_rows(rows: Sequence[Sequence[int]], type_rows: Sequence[Sequence[int]], pad_id: int, truncated: Sequence[bool]) -> EncodedBatch:
    longest = max(len(row) for row in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    types = np.zeros((len(rows), longest), dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for index, (row, type_row) in enumerate(zip(rows, type_rows)):
        ids[index, : len(row)] = row
        types[index, : len(type_row)] = type_row
        mask[index, : len(row)] = 1
    return EncodedBatch(ids, mask, types, np.asarray(truncated, dtype=bool))


class BundleTokenizer:
    """Encodes texts or pairs, truncating to the bundle's max sequence length and saying so."""

    def __init__(self, tokenizer_file: Path, max_seq_len: int):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust side raises plain Exception for a bad file
            raise BundleError(f"{tokenizer_file} cannot be loaded as a tokenizers file ({error}); re-export the bundle") from None
        self.max_seq_len = max_seq_len
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.pad_id = self.find_pad_id()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def find_pad_id(self) -> int:
        for token in PAD_TOKEN_CANDIDATES:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return 0

    def encode_texts(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None) -> EncodedBatch:
        check_texts(texts, "texts")
        if text_pairs is not None:
            check_texts(text_pairs, "text_pairs")
            if len(text_pairs) != len(texts):
                raise InputError(f"got {len(texts)} texts but {len(text_pairs)} text_pairs; give one pair per text")
            encodings = self.tokenizer.encode_batch(list(zip(texts, text_pairs)))
        else:
            encodings = self.tokenizer.encode_batch(list(texts))
        return pad_rows(
            [e.ids for e in encodings], [e.type_ids for e in encodings], self.pad_id,
            [bool(e.overflowing) for e in encodings],
        )

    def encode_ids(self, token_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None = None) -> EncodedBatch:
        """Already-tokenized input (special tokens included); rows longer than the max are truncated."""
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence) or not token_ids:
            raise InputError(f"token_ids must be a non-empty list of lists of ints, got {type(token_ids).__name__}")
        rows = [self.check_id_row(row, index) for index, row in enumerate(token_ids)]
        types = [[0] * len(row) for row in rows] if token_type_ids is None else [list(t) for t in token_type_ids]
        if len(types) != len(rows) or any(len(t) < min(len(r), self.max_seq_len) for t, r in zip(types, rows)):
            raise InputError("token_type_ids must have one row per token_ids row, each as long as its row")
        truncated = [len(row) > self.max_seq_len for row in rows]
        limit = self.max_seq_len
        return pad_rows([row[:limit] for row in rows], [t[:limit] for t in types], self.pad_id, truncated)

    def check_id_row(self, row, index: int) -> list[int]:
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)) or len(row) == 0:
            raise InputError(f"token_ids[{index}] must be a non-empty list of ints, got {row!r:.60}")
        values = np.asarray(row)
        if values.dtype.kind not in "iu":
            raise InputError(f"token_ids[{index}] holds {values.dtype} values; expected integers")
        if values.min() < 0 or values.max() >= self.vocab_size:
            raise InputError(f"token_ids[{index}] has ids outside the vocabulary 0..{self.vocab_size - 1}")
        return values.astype(np.int64).tolist()


def check_texts(texts, argument: str) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(f"{argument} must be a list of strings, got {type(texts).__name__}; wrap a single text in a list")
    if not texts:
        raise InputError(f"{argument} is empty; give at least one text")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{argument}[{index}] is {type(text).__name__}, expected str")
        if not text.strip():
            raise InputError(f"{argument}[{index}] is empty or only whitespace; the model needs some text")
