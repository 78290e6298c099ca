"""Tiny random multi-exit models with a real tokenizer, for tests that need a model directory.

Every supported architecture gets a hidden size of 32 and a vocabulary of ~150 WordPiece tokens
(common words plus single characters, so any English text tokenizes without [UNK] floods).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import AutoConfig, PreTrainedTokenizerFast

from pcee.modeling.config import PceeConfig
from pcee.modeling.model import MultiExitClassifier

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID = 0
COMMON_WORDS = (
    "the a an and or but of to in on at for with is was are were be it this that not no very "
    "movie film story good bad great awful fun dull love hate plot actors what who when why how "
    "did does do you i we they he she his her my our day time new old best worst really quite"
).split()
HIDDEN_SIZE = 32
MAX_POSITIONS = 128


def tiny_vocabulary() -> dict[str, int]:
    pieces = list(SPECIAL_TOKENS) + COMMON_WORDS + list(string.ascii_lowercase)
    pieces += ["##" + letter for letter in string.ascii_lowercase] + list(string.digits + string.punctuation)
    return {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocabulary = tiny_vocabulary()
    tokenizer = Tokenizer(WordPiece(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocabulary["[CLS]"], vocabulary["[SEP]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_backbone_config(model_type: str, num_layers: int, vocab_size: int):
    if model_type == "distilbert":
        sizes = dict(dim=HIDDEN_SIZE, hidden_dim=64, n_layers=num_layers, n_heads=2)
    else:
        sizes = dict(
            hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2
        )
    if model_type == "albert":
        sizes["embedding_size"] = 16
    # RoBERTa numbers positions from pad_token_id + 1, so it needs pad_token_id + 1 spare positions.
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS + PAD_ID + 2,
        pad_token_id=PAD_ID,
        **sizes,
    )


def make_tiny_model(
    model_type: str = "bert",
    exit_pooling: str = "cls",
    learned_confidence: bool = False,
    num_layers: int = 3,
    num_labels: int = 2,
    task: str | None = None,
    seed: int = 0,
    label_names: list[str] | None = None,
) -> MultiExitClassifier:
    torch.manual_seed(seed)
    pcee_config = PceeConfig(
        num_labels=num_labels,
        exit_pooling=exit_pooling,
        learned_confidence=learned_confidence,
        max_seq_len=64,
        task=task,
        label_names=list(label_names or []),
    )
    model = MultiExitClassifier(
        tiny_backbone_config(model_type, num_layers, len(tiny_vocabulary())), pcee_config
    )
    return model.eval()


def make_tiny_model_dir(tmp_path: Path, **options) -> Path:
    """Save a tiny random model (`make_tiny_model` options) + tokenizer as pcee-train would; returns the directory."""
    model = make_tiny_model(**options)
    config = model.pcee_config
    learned = "-learned" if config.learned_confidence else ""
    directory = (
        Path(tmp_path)
        / f"tiny-{model.backbone_config.model_type}-{config.exit_pooling}{learned}-{model.num_layers}"
    )
    model.save_pretrained(directory, make_tiny_tokenizer())
    return directory
