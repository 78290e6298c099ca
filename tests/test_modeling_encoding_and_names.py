"""Hardening of the modeling room: bounded tokenizing work, its public names, the mode of saved weights."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from tiny_models import make_tiny_model, make_tiny_tokenizer

from pcee.modeling.data import TextDataset
from pcee.modeling.train import encode
from pcee.runtime.atomic import new_file_mode

HUGE_TEXT = "good movie " * 2_000_000  # 22 MB: tokenized whole, it takes ~20 s and ~3 GB
MAX_SEQ_LEN = 32


class LengthCheckingTokenizer:
    """The tiny tokenizer, refusing any text longer than a small multiple of the max sequence length."""

    def __init__(self, longest_allowed: int):
        self.tokenizer = make_tiny_tokenizer()
        self.longest_allowed = longest_allowed

    def __call__(self, texts, text_pairs=None, **options):
        handed = texts + (text_pairs or [])
        longest = max(len(text) for text in handed)
        assert longest <= self.longest_allowed, f"the tokenizer was handed a text of {longest:,} characters"
        return self.tokenizer(texts, text_pairs, **options)


@pytest.mark.parametrize("pairs", [None, ["a short second text"]], ids=["single", "pair"])
def test_encode_cuts_a_huge_text_before_tokenizing_and_still_fills_max_seq_len(pairs):
    dataset = TextDataset([HUGE_TEXT], pairs, [1], ("0", "1"), "memory")
    encoded = encode(LengthCheckingTokenizer(longest_allowed=100 * MAX_SEQ_LEN), dataset, MAX_SEQ_LEN)
    assert len(encoded.input_ids[0]) == MAX_SEQ_LEN


def test_encode_keeps_ordinary_texts_whole():
    texts = ["the movie was good", "a dull story with awful actors " * 3]
    dataset = TextDataset(texts, None, [1, 0], ("0", "1"), "memory")
    expected = make_tiny_tokenizer()(texts, truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]
    assert encode(make_tiny_tokenizer(), dataset, MAX_SEQ_LEN).input_ids == expected


@pytest.mark.parametrize(
    "name, module",
    [
        ("MultiExitClassifier", "model"),
        ("PceeConfig", "config"),
        ("TrainingConfig", "train"),
        ("encode", "train"),
        ("train_model", "train"),
        ("predict_all_exits", "train"),
        ("load_data", "data"),
        ("TextDataset", "data"),
        ("DataError", "data"),
        ("ModelingError", "errors"),
        ("task_metric", "metrics"),
        ("MetricError", "metrics"),
    ],
)
def test_public_names_import_from_the_package(name, module):
    import pcee.modeling

    assert name in pcee.modeling.__all__
    assert getattr(pcee.modeling, name) is getattr(importlib.import_module(f"pcee.modeling.{module}"), name)


def test_unknown_package_name_is_an_attribute_error():
    import pcee.modeling

    with pytest.raises(AttributeError, match="pcee.modeling has no attribute 'NoSuchThing'"):
        pcee.modeling.NoSuchThing  # noqa: B018


def test_data_and_metrics_stay_free_of_torch():
    check = "import sys, pcee.modeling.data, pcee.modeling.metrics; print('torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"


def test_saved_weights_get_the_mode_of_a_new_file(tmp_path):
    make_tiny_model(num_layers=1).save_pretrained(tmp_path)
    assert oct(os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == oct(new_file_mode())
