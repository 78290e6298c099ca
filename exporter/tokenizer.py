"""The bundle's tokenizer: the model's tokenizer.json (or one built from a reference checkpoint's vocab.txt), checked against the model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import BertWordPieceTokenizer, Tokenizer
from tokenizers.models import WordPiece
from transformers import PreTrainedTokenizerFast

from pcee.modeling.errors import ModelDirectoryError
from pcee.modeling.model import CONFIG_NAME
from pcee.runtime import TOKENIZER_DIR, TOKENIZER_JSON, FileEntry, TokenizerInfo, tokenizer_file

from .errors import TokenizerError

TOKENIZER_CONFIG = "tokenizer_config.json"
WORDPIECE_VOCABULARY = "vocab.txt"
OPTIONAL_TOKENIZER_FILES = (
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    WORDPIECE_VOCABULARY,
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
BERT_SPECIAL_TOKENS = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}


@dataclass(frozen=True)
class ModelTokenizer:
    """The model's tokenizer: where the bundle's tokenizer.json comes from, and a transformers view for the parity batches."""

    source: Path  # the model directory's tokenizer.json, or the vocab.txt it was built from
    for_batches: PreTrainedTokenizerFast
    built: Tokenizer | None = None  # the tokenizer.json to write, when it was built from vocab.txt

    @property
    def built_from(self) -> str | None:
        return None if self.built is None else self.source.name


def load_tokenizer(model_dir: Path) -> ModelTokenizer:
    """The model's tokenizer.json; for a reference PABEE/PCEE checkpoint, which has none, one built from its vocab.txt."""
    if (model_dir / TOKENIZER_JSON).is_file():
        return ModelTokenizer(model_dir / TOKENIZER_JSON, load_fast_tokenizer(model_dir))
    if (model_dir / WORDPIECE_VOCABULARY).is_file():
        built = wordpiece_tokenizer(model_dir)
        return ModelTokenizer(model_dir / WORDPIECE_VOCABULARY, wrap_for_batches(built), built)
    raise ModelDirectoryError(
        f"{model_dir} has no {TOKENIZER_JSON} (and no BERT {WORDPIECE_VOCABULARY} to build one from); the runtime "
        "tokenizes with it. Save the model with its fast tokenizer (pcee-train does), or add tokenizer.json from "
        "the backbone it was trained from."
    )


def load_fast_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # tokenizers and transformers raise many types for a damaged file
        raise ModelDirectoryError(
            f"{model_dir}: the tokenizer cannot be loaded ({type(error).__name__}: {error})"
        ) from None
    if tokenizer.pad_token is None:
        raise ModelDirectoryError(
            f"{model_dir}: the tokenizer has no padding token; batches cannot be padded. Set pad_token in tokenizer_config.json"
        )
    return tokenizer


def wordpiece_tokenizer(model_dir: Path) -> Tokenizer:
    """BERT's tokenizer from a WordPiece vocab.txt: [CLS] A [SEP] for one text, [CLS] A [SEP] B [SEP] for a pair.

    Not transformers' BertTokenizerFast(vocab_file=...): in transformers 5 it silently builds a
    5-token vocabulary. The tokenizers library reads the whole file.
    """
    path = model_dir / WORDPIECE_VOCABULARY
    try:
        vocabulary = WordPiece.read_file(str(path))
    except Exception as error:  # the Rust reader raises plain Exception
        raise TokenizerError(
            f"{path} cannot be read as a WordPiece vocabulary, one token per line ({error})"
        ) from None
    missing = [token for token in BERT_SPECIAL_TOKENS.values() if token not in vocabulary]
    if missing:
        raise TokenizerError(
            f"{path} lacks {', '.join(missing)}, so it is not a BERT WordPiece vocabulary and cannot be turned into a "
            f"tokenizer. Add the model's own {TOKENIZER_JSON} to {model_dir}."
        )
    wordpiece = BertWordPieceTokenizer(vocabulary, **normalization(model_dir, vocabulary))
    return Tokenizer.from_str(wordpiece.to_str())


def normalization(model_dir: Path, vocabulary: dict[str, int]) -> dict[str, bool | None]:
    """The checkpoint's do_lower_case and strip_accents; without do_lower_case, the case the vocabulary shows."""
    settings = tokenizer_settings(model_dir)
    lowercase, strip_accents = settings.get("do_lower_case"), settings.get("strip_accents")
    return {
        "lowercase": lowercase if isinstance(lowercase, bool) else is_uncased(vocabulary),
        "strip_accents": strip_accents
        if isinstance(strip_accents, bool)
        else None,  # None: strip when lowercasing
    }


def tokenizer_settings(model_dir: Path) -> dict:
    """config.json overlaid with tokenizer_config.json, where transformers-3 checkpoints keep do_lower_case."""
    settings = {}
    for name in (CONFIG_NAME, TOKENIZER_CONFIG):
        path = model_dir / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TokenizerError(f"{path} is not valid JSON ({error}); fix or remove it") from None
        settings.update(data if isinstance(data, dict) else {})
    return settings


def is_uncased(vocabulary: dict[str, int]) -> bool:
    """BERT-uncased (the reference default) has no upper-case token besides its [SPECIAL] ones; a cased vocabulary has many."""
    return not any(
        token != token.lower() for token in vocabulary if not (token.startswith("[") and token.endswith("]"))
    )


def wrap_for_batches(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # A copy: transformers sets padding and truncation on the tokenizer it wraps, the bundle's must have neither.
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()), **BERT_SPECIAL_TOKENS
    )


def write_tokenizer(model_dir: Path, bundle_dir: Path, tokenizer: ModelTokenizer) -> TokenizerInfo:
    """tokenizer/tokenizer.json (copied, or the one built from vocab.txt) first, then the model's other tokenizer files."""
    target = bundle_dir / TOKENIZER_DIR
    target.mkdir()
    if tokenizer.built is not None:
        tokenizer.built.save(str(target / TOKENIZER_JSON))
    written = []
    for name in (TOKENIZER_JSON, *OPTIONAL_TOKENIZER_FILES):
        if (model_dir / name).is_file() and not (target / name).exists():
            shutil.copy2(model_dir / name, target / name)
        if (target / name).is_file():
            written.append(FileEntry.of(bundle_dir, tokenizer_file(name)))
    return TokenizerInfo(written, tokenizer.built_from)


def check_vocabulary_size(tokenizer_path: Path, source: Path, vocab_size: int) -> None:
    """The bundle's tokenizer must fit the embedding table the way the runtime will count it.

    Ids past the table fail at inference. A vocab.txt lists exactly the table's rows, so one of
    another length is another model's vocabulary whose ids would silently mean other tokens; a
    tokenizer.json may have fewer tokens than a table padded to a round size.
    """
    size = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)
    if size > vocab_size or (source.name == WORDPIECE_VOCABULARY and size != vocab_size):
        raise TokenizerError(
            f"the tokenizer does not fit the model: tokenizer size {size} from {source} vs model config vocab_size "
            f"{vocab_size} from {source.parent / CONFIG_NAME} ({'more' if size > vocab_size else 'fewer'} tokens than the "
            f"embedding table has rows). Put the tokenizer files the model was trained with into {source.parent}."
        )
