"""Tokenization with the `tokenizers` library from the bundle's tokenizer.json (no transformers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError, InputError

PAD_TOKEN_CANDIDATES = ("[PAD]", "<pad>", "<PAD>")
TOKEN_TYPES = 2  # segment ids: 0 for the first sentence, 1 for the second
PREFIX_CHARS_PER_TOKEN = 16  # a first guess at how much text max_seq_len tokens take; doubled when short


@dataclass
class EncodedBatch:
    """Token arrays padded to the batch's own longest row."""

    input_ids: np.ndarray  # int64 [n, longest]
    attention_mask: np.ndarray  # int64 [n, longest]
    token_type_ids: np.ndarray  # int64 [n, longest]
    truncated: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows) -> EncodedBatch:
        """Rows `rows`, re-padded to their own longest sequence."""
        longest = max(1, int(self.attention_mask[rows].sum(axis=1).max()))
        return EncodedBatch(
            self.input_ids[rows, :longest],
            self.attention_mask[rows, :longest],
            self.token_type_ids[rows, :longest],
            self.truncated[rows],
        )


def pad_rows(
    rows: Sequence[Sequence[int]], type_rows: Sequence[Sequence[int]], pad_id: int, truncated: Sequence[bool]
) -> EncodedBatch:
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
            raise BundleError(
                f"{tokenizer_file} cannot be loaded as a tokenizers file ({error}); re-export the bundle"
            ) from None
        self.max_seq_len = max_seq_len
        self.tokenizer.no_padding()
        self.counter = Tokenizer.from_str(self.tokenizer.to_str())  # counts tokens of a prefix, untruncated
        self.counter.no_truncation()
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
        texts = [self.usable_prefix(text) for text in texts]
        if text_pairs is not None:
            check_texts(text_pairs, "text_pairs")
            if len(text_pairs) != len(texts):
                raise InputError(
                    f"got {len(texts)} texts but {len(text_pairs)} text_pairs; give one pair per text"
                )
            encodings = self.tokenizer.encode_batch(
                list(zip(texts, [self.usable_prefix(pair) for pair in text_pairs]))
            )
        else:
            encodings = self.tokenizer.encode_batch(texts)
        return pad_rows(
            [e.ids for e in encodings],
            [e.type_ids for e in encodings],
            self.pad_id,
            [bool(e.overflowing) for e in encodings],
        )

    def usable_prefix(self, text: str) -> str:
        """The shortest prefix of `text`, cut at whitespace, that still yields every token truncation can keep.

        Tokenizing a whole 10 MB text to keep its first max_seq_len tokens costs gigabytes. Words
        are tokenized independently, so a prefix cut at whitespace gives the same first tokens;
        once it holds max_seq_len tokens the text overflows either way, and the truncated flag
        stays right. The prefix doubles until that holds (whitespace runs hold no tokens).
        """
        length = self.max_seq_len * PREFIX_CHARS_PER_TOKEN
        while length < len(text):
            cut = text.rfind(" ", 0, length)
            prefix = text[: cut if cut > 0 else length]
            if len(self.counter.encode(prefix, add_special_tokens=False).ids) >= self.max_seq_len:
                return prefix
            length *= 2
        return text

    def encode_ids(
        self, token_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None = None
    ) -> EncodedBatch:
        """Already-tokenized input (special tokens included); rows longer than the max are truncated."""
        rows = self.check_id_rows(token_ids, "token_ids", self.vocab_size, "the vocabulary")
        if token_type_ids is None:
            types = [[0] * len(row) for row in rows]
        else:
            types = self.check_id_rows(token_type_ids, "token_type_ids", TOKEN_TYPES, "the segment ids")
        if len(types) != len(rows) or any(len(t) != len(r) for t, r in zip(types, rows)):
            raise InputError(
                "token_type_ids must have one row per token_ids row, each exactly as long as its row"
            )
        truncated = [len(row) > self.max_seq_len for row in rows]
        limit = self.max_seq_len
        return pad_rows([row[:limit] for row in rows], [t[:limit] for t in types], self.pad_id, truncated)

    @staticmethod
    def check_id_rows(rows, argument: str, limit: int, meaning: str) -> list[list[int]]:
        if isinstance(rows, (str, bytes)) or not isinstance(rows, (Sequence, np.ndarray)) or len(rows) == 0:
            raise InputError(
                f"{argument} must be a non-empty list of lists of ints, got {type(rows).__name__}"
            )
        return [check_id_row(row, f"{argument}[{index}]", limit, meaning) for index, row in enumerate(rows)]


def check_id_row(row, where: str, limit: int, meaning: str) -> list[int]:
    """One row of ids: a flat, non-empty sequence of integers in 0..limit-1."""
    if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)) or len(row) == 0:
        raise InputError(f"{where} must be a non-empty list of ints, got {type(row).__name__}")
    if not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in row):
        offender = next(
            value for value in row if not isinstance(value, (int, np.integer)) or isinstance(value, bool)
        )
        shown = (
            f"{offender!r:.60} " if isinstance(offender, (str, float, bool)) else ""
        )  # never repr a nested list
        raise InputError(f"{where} holds {shown}({type(offender).__name__}); expected integers")
    values = np.asarray(row, dtype=np.int64) if all(abs(int(v)) < 2**63 for v in row) else None
    if values is None or values.min() < 0 or values.max() >= limit:
        raise InputError(f"{where} has values outside {meaning}, 0..{limit - 1}")
    return values.tolist()


def check_texts(texts, argument: str) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(
            f"{argument} must be a list of strings, got {type(texts).__name__}; wrap a single text in a list"
        )
    if not texts:
        raise InputError(f"{argument} is empty; give at least one text")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{argument}[{index}] is {type(text).__name__}, expected str")
        if not text.strip():
            raise InputError(f"{argument}[{index}] is empty or only whitespace; the model needs some text")
        if not is_encodable(text):
            raise InputError(
                f"{argument}[{index}] is not valid Unicode (it holds a lone surrogate); decode the input as UTF-8 first"
            )


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
