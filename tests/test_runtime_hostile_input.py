"""Hostile use of the runtime: each test pins one defect of the hardening issue (#11)."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pcee.runtime import (
    MANIFEST_NAME,
    BundleError,
    EarlyExitRuntime,
    InputError,
    Manifest,
    OperatingPoint,
    PolicyError,
)
from pcee.runtime.cli import main as predict_cli


@pytest.fixture(scope="module")
def bundle(sst2_bundle):
    return sst2_bundle


@pytest.fixture(scope="module")
def runtime(bundle):
    return EarlyExitRuntime.from_bundle(bundle)


def edited_copy(bundle, tmp_path, edit):
    """A copy of the bundle whose manifest JSON went through `edit`."""
    target = tmp_path / "edited"
    shutil.copytree(bundle, target)
    data = json.loads((target / MANIFEST_NAME).read_text())
    edit(data, target)
    (target / MANIFEST_NAME).write_text(json.dumps(data))
    return target


# -- 1. operating points are typed strictly and a bad one is never installed -------------------------
@pytest.mark.parametrize(
    "point",
    [
        {"policy": "budgeted", "layer": 2.0},
        {"policy": "pcee", "tau": "0.2", "patience": 2},
        {"policy": "pcee", "tau": True, "patience": 2},
        {"policy": "pcee", "tau": 0.2, "patience": 2.0},
        {"policy": "pcee", "tau": 0.2, "patience": 2, "ensemble": "yes"},
        {"policy": 3},
    ],
)
def test_a_mistyped_point_is_refused_and_the_runtime_keeps_serving(runtime, point):
    before = runtime.operating_point
    with pytest.raises(PolicyError):
        runtime.set_operating_point(point)
    assert runtime.operating_point == before
    assert runtime.predict(["good"]).predictions[0].exit_layer >= 1


def test_numpy_scalars_are_accepted_as_numbers(runtime):
    point = runtime.set_operating_point({"policy": "pcee", "tau": np.float32(0.5), "patience": np.int64(1)})
    assert point == OperatingPoint("pcee", tau=0.5, patience=1)
    runtime.set_operating_point("default")


def test_a_mistyped_point_in_the_manifest_fails_at_load(bundle, tmp_path):
    def float_layer(data, _):
        data["operating_point"] = {"policy": "budgeted", "layer": 2.0}

    with pytest.raises(BundleError, match="layer must be an integer"):
        EarlyExitRuntime.from_bundle(edited_copy(bundle, tmp_path, float_layer))


def test_a_signal_that_contradicts_the_policy_is_refused(bundle, tmp_path):
    def wrong_signal(data, _):
        data["operating_point"]["signal"] = "max_probability"

    with pytest.raises(BundleError, match="signal"):
        EarlyExitRuntime.from_bundle(edited_copy(bundle, tmp_path, wrong_signal))


# -- 4. tokenizer files are hashed and checked against the model ------------------------------------
def add_tokens(target, count: int) -> None:
    """Grow the bundle's tokenizer vocabulary by `count` new tokens."""
    path = target / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    for index in range(count):
        vocab[f"extra-token-{index}"] = len(vocab)
    path.write_text(json.dumps(tokenizer))


def test_a_swapped_tokenizer_fails_at_load(bundle, tmp_path):
    with pytest.raises(BundleError, match="tokenizer.json: sha256 does not match"):
        EarlyExitRuntime.from_bundle(edited_copy(bundle, tmp_path, lambda _, target: add_tokens(target, 1)))


def test_a_foreign_tokenizer_with_a_larger_vocabulary_fails_at_load_even_unhashed(bundle, tmp_path):
    def grow(data, target):
        add_tokens(target, data["model"]["vocab_size"] + 5)

    with pytest.raises(BundleError, match="embedding table has"):
        EarlyExitRuntime.from_bundle(edited_copy(bundle, tmp_path, grow), verify_hashes=False)


# -- 5. manifest paths stay inside the bundle ---------------------------------------------------------
@pytest.mark.parametrize("where", ["absolute", "parent", "tokenizer"])
def test_paths_outside_the_bundle_are_refused(bundle, tmp_path, where):
    outside = tmp_path / "outside"
    shutil.copytree(bundle, outside)

    def escape(data, _):
        if where == "absolute":
            data["graphs"]["layers"][0]["file"] = str(outside / "onnx" / "layer_01.onnx")
        elif where == "parent":
            data["graphs"]["layers"][0]["file"] = "../outside/onnx/layer_01.onnx"
        else:
            data["tokenizer"]["files"][0]["file"] = "../../../../etc/passwd"

    with pytest.raises(BundleError, match="relative to the bundle|outside the bundle"):
        Manifest.load(edited_copy(bundle, tmp_path, escape), verify_hashes=False)


# -- 6. manifest values are cross-checked against the graphs -----------------------------------------
def set_labels(data, _):
    data["model"]["labels"] = ["a", "b", "c"]
    data["model"]["num_labels"] = 3


def swap_layers(data, _):
    layers = data["graphs"]["layers"]
    layers[0], layers[1] = layers[1], layers[0]


def negative_length(data, _):
    data["model"]["max_seq_len"] = -4


def empty_tokenizer(data, target):
    (target / "tokenizer" / "tokenizer.json").write_bytes(b"")


def deep_json(data, target):
    return None


@pytest.mark.parametrize(
    "edit, message",
    [
        (set_labels, "does not fit the model facts"),
        (swap_layers, "the file says it holds graph 'layer_02', the manifest puts it at 'layer_01'"),
        (negative_length, "max_seq_len must be a positive integer"),
        (empty_tokenizer, "tokenizer.json is empty"),
    ],
)
def test_manifest_values_are_checked_at_load(bundle, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message):
        EarlyExitRuntime.from_bundle(edited_copy(bundle, tmp_path, edit), verify_hashes=False)


def test_a_graph_that_disagrees_with_its_spec_fails_at_load(bundle, tmp_path):
    def relabel_spec(data, _):
        for graph in data["graphs"]["layers"]:
            graph["outputs"][1]["shape"] = ["batch_size", 3]
        data["model"]["labels"] = ["a", "b", "c"]
        data["model"]["num_labels"] = 3

    with pytest.raises(BundleError, match="logits axis 1 is 2, the manifest declares 3"):
        EarlyExitRuntime.from_bundle(edited_copy(bundle, tmp_path, relabel_spec), verify_hashes=False)


def test_deeply_nested_json_is_a_bundle_error(bundle, tmp_path):
    target = tmp_path / "deep"
    shutil.copytree(bundle, target)
    (target / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nests JSON too deeply"):
        Manifest.load(target)


# -- 7. huge texts cost what max_seq_len can use -----------------------------------------------------
class RecordingTokenizer:
    """Stands in for the tokenizers object: records the longest text it was handed, then delegates."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def encode_batch(self, inputs):
        pieces = [piece for item in inputs for piece in (item if isinstance(item, tuple) else (item,))]
        self.longest = max(self.longest, *map(len, pieces))
        return self.tokenizer.encode_batch(inputs)


def test_a_huge_text_is_cut_before_tokenizing(bundle, monkeypatch):
    runtime = EarlyExitRuntime.from_bundle(bundle)
    recorder = RecordingTokenizer(runtime.tokenizer.tokenizer)
    monkeypatch.setattr(runtime.tokenizer, "tokenizer", recorder)
    huge = "good " * 2_000_000
    result = runtime.predict([huge])
    assert result.predictions[0].truncated
    assert recorder.longest < 100 * runtime.tokenizer.max_seq_len, (
        f"{recorder.longest} characters went to the tokenizer"
    )
    assert np.array_equal(
        runtime.tokenizer.encode_texts([huge]).input_ids,
        runtime.tokenizer.encode_texts(["good " * 500]).input_ids,
    )


@pytest.mark.parametrize(
    "text",
    [
        "good " * 10 + " " * 50_000 + "film " * 10,  # long whitespace runs hold no tokens
        "x" * 20_000,  # one huge word
        "good," * 5_000,  # punctuation splits without whitespace
    ],
    ids=["whitespace-run", "one-huge-word", "punctuation"],
)
def test_cut_texts_tokenize_exactly_like_whole_ones(runtime, text):
    cut = runtime.tokenizer.encode_texts([text])
    whole = runtime.tokenizer.tokenizer.encode(text)
    assert cut.input_ids[0].tolist() == whole.ids and bool(cut.truncated[0]) == bool(whole.overflowing)


def test_pairs_of_huge_texts_truncate_like_whole_ones(pair_bundle):
    runtime = EarlyExitRuntime.from_bundle(pair_bundle)
    first, second = "good " * 400, "a dull story " * 150  # past the cut, small enough to tokenize whole
    cut = runtime.tokenizer.encode_texts([first], [second])
    whole = runtime.tokenizer.tokenizer.encode(first, second)
    assert cut.input_ids[0].tolist() == whole.ids and cut.token_type_ids[0].tolist() == whole.type_ids


# -- 9. typed errors for bad input -------------------------------------------------------------------
def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: r.predict(["fine", "bad \ud800 text"]), r"texts\[1\] is not valid Unicode"),
        (lambda r: r.predict_ids([[1, 5, 2]], token_type_ids=[[0, 7, 0]]), "outside the segment ids"),
        (lambda r: r.predict_ids([[1, 5, 2]], token_type_ids=[[0, 0.5, 0]]), "expected integers"),
        (lambda r: r.predict_ids([[1, 5, 2]], token_type_ids=[[0, "1", 0]]), "expected integers"),
        (lambda r: r.predict_ids([[1, 5, 2]], token_type_ids=[[0, 0]]), "exactly as long"),
        (lambda r: r.predict_ids([nested(50_000)]), "expected integers"),
        (lambda r: r.predict_ids([[1, True, 2]]), "expected integers"),
        (lambda r: r.predict_ids([[1, 10**30, 2]]), "outside the vocabulary"),
        (lambda r: r.predict(["ok"], batch_size=True), "batch_size"),
    ],
)
def test_bad_input_is_an_input_error(runtime, call, message):
    with pytest.raises(InputError, match=message):
        call(runtime)


def test_a_string_tau_is_a_policy_error(runtime):
    with pytest.raises(PolicyError, match="tau must be a number"):
        runtime.predict(["good"], operating_point={"policy": "pcee", "tau": "0.2", "patience": 1})


# -- 11. pairs are checked against the task ----------------------------------------------------------
def test_pairs_sent_to_a_single_sentence_bundle_are_refused(runtime):
    with pytest.raises(InputError, match="single sentences"):
        runtime.predict(["good"], text_pairs=["bad"])


def test_a_pair_bundle_needs_pairs(pair_bundle):
    runtime = EarlyExitRuntime.from_bundle(pair_bundle)
    with pytest.raises(InputError, match="sentence pairs"):
        runtime.predict(["good"])
    assert runtime.predict(["Who wrote it?"], text_pairs=["Ann wrote it."]).predictions[0].exit_layer >= 1


# -- 10. pcee-predict: one clear line, never a traceback; output lines match input lines -------------
def test_predict_refuses_a_non_utf8_input_file_in_one_line(bundle, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("tr\xe8s bon\n".encode("latin-1"))
    result = CliRunner().invoke(predict_cli, [str(bundle), "--input", str(path)])
    assert result.exit_code != 0 and "not UTF-8" in result.output and result.exception.__class__ is SystemExit


def test_predict_on_a_full_disk_says_so_and_leaves_no_empty_file(bundle, tmp_path, monkeypatch):
    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pcee.runtime.atomic.os.fsync", full_disk)
    output = tmp_path / "out.jsonl"
    result = CliRunner().invoke(predict_cli, [str(bundle), "--text", "good", "--output", str(output)])
    assert (
        result.exit_code != 0
        and "No space left on device" in result.output
        and result.exception.__class__ is SystemExit
    )
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_predict_keeps_one_output_line_per_input_line(bundle, tmp_path):
    path = tmp_path / "inputs.txt"
    path.write_text("good\n\n   \nbad film\n")
    result = (
        CliRunner(mix_stderr=False).invoke(predict_cli, [str(bundle), "--input", str(path)])
        if "mix_stderr" in CliRunner.__init__.__code__.co_varnames
        else CliRunner().invoke(predict_cli, [str(bundle), "--input", str(path)])
    )
    rows = [
        json.loads(line)
        for line in result.stdout.splitlines()
        if line.startswith("{") and "backend" not in line
    ]
    assert [("error" in row) for row in rows] == [False, True, True, False]
