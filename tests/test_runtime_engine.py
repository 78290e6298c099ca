"""The runtime on real exported bundles: batching, fidelity to PyTorch, threads, bad input, broken bundles."""

from __future__ import annotations

import json
import random
import shutil
import threading

import numpy as np
import pytest
import torch
from bundles import SENTENCES, entropy_quantile_point
from click.testing import CliRunner

from pcee.modeling.model import MultiExitClassifier
from pcee.runtime import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleError,
    EarlyExitRuntime,
    InputError,
    OperatingPoint,
    PolicyError,
)
from pcee.runtime.cli import main as predict_cli


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles.bundle(exit_pooling="mean", learned_confidence=True, num_layers=4)


@pytest.fixture(scope="module")
def runtime(bundle):
    return EarlyExitRuntime.from_bundle(bundle)


@pytest.fixture(scope="module")
def pair_runtime(pair_bundle):
    return EarlyExitRuntime.from_bundle(pair_bundle)


@pytest.fixture(scope="module")
def varied_point(runtime):
    return entropy_quantile_point(runtime, SENTENCES, 0.5, patience=1)


def test_loading_reports_backend_and_device(runtime):
    assert runtime.backend_name == "onnxruntime" and runtime.device == "cpu"
    assert runtime.operating_point.policy == "pcee" and runtime.num_layers == 4


def test_rows_really_exit_at_different_layers(runtime, varied_point):
    layers = {row.exit_layer for row in runtime.predict(SENTENCES, operating_point=varied_point).predictions}
    assert len(layers) > 1


@pytest.mark.parametrize(
    "policy", ["pcee", "pcee-maxprob", "pcee-learned", "pabee", "budgeted", "full", "ensemble"]
)
def test_batch_results_equal_one_row_at_a_time(runtime, varied_point, policy):
    exits = runtime.run_all_exits(runtime.tokenizer.encode_texts(SENTENCES))
    points = {
        "pcee": OperatingPoint("pcee", tau=varied_point.tau, patience=2),
        "ensemble": OperatingPoint("pcee", tau=varied_point.tau, patience=2, ensemble=True),
        "pcee-maxprob": OperatingPoint(
            "pcee-maxprob", tau=float(np.median(exits.max_probability)), patience=1
        ),
        "pcee-learned": OperatingPoint(
            "pcee-learned", tau=float(np.median(exits.confidence_score)), patience=1
        ),
        "pabee": OperatingPoint("pabee", patience=1),
        "budgeted": OperatingPoint("budgeted", layer=2),
        "full": OperatingPoint("full"),
    }
    batched = runtime.predict(SENTENCES, operating_point=points[policy], batch_size=8).predictions
    for text, together in zip(SENTENCES, batched):
        alone = runtime.predict([text], operating_point=points[policy]).predictions[0]
        assert (alone.exit_layer, alone.label_index) == (together.exit_layer, together.label_index)
        np.testing.assert_allclose(alone.probabilities, together.probabilities, atol=1e-5)


def test_full_model_policy_equals_pytorch_last_exit(bundle, runtime, tmp_path):
    model_dir = bundle.parent / bundle.name.removesuffix("-pcee")
    model = MultiExitClassifier.from_pretrained(model_dir)
    batch = runtime.tokenizer.encode_texts(SENTENCES)
    with torch.no_grad():
        logits = model(
            torch.from_numpy(batch.input_ids),
            torch.from_numpy(batch.attention_mask),
            torch.from_numpy(batch.token_type_ids),
        ).logits[-1]
    expected = torch.softmax(logits, -1).numpy()
    result = runtime.predict(SENTENCES, operating_point=OperatingPoint("full"))
    assert [row.exit_layer for row in result.predictions] == [4] * len(SENTENCES)
    np.testing.assert_allclose(
        np.stack([row.probabilities for row in result.predictions]), expected, atol=1e-5
    )
    assert [row.label_index for row in result.predictions] == list(expected.argmax(-1))


@pytest.mark.parametrize(
    ("point", "name", "output"),
    [
        (OperatingPoint("pcee", tau=0.9, patience=1), "normalized_entropy", "entropy"),
        (OperatingPoint("pcee-maxprob", tau=0.1, patience=1), "max_probability", "max_probability"),
        (OperatingPoint("full"), "normalized_entropy", "entropy"),
    ],
)
def test_each_row_names_the_signal_its_policy_judged(runtime, point, name, output):
    texts = ["the movie was good", "a dull story"]
    rows = runtime.predict(texts, operating_point=point).predictions
    exits = runtime.run_all_exits(runtime.tokenizer.encode_texts(texts))
    for index, row in enumerate(rows):
        assert row.exit_signal_name == name
        assert row.exit_signal == pytest.approx(
            float(getattr(exits, output)[index, row.exit_layer - 1]), abs=1e-5
        )


def test_call_statistics_follow_equation_four(runtime, varied_point):
    result = runtime.predict(SENTENCES, operating_point=varied_point)
    layers = [row.exit_layer for row in result.predictions]
    assert result.layers_run == sum(layers)
    assert result.layer_speedup == pytest.approx(1 - sum(layers) / (len(layers) * 4))
    assert result.elapsed_seconds > 0


def test_eight_threads_with_live_switches_match_single_threaded(runtime, varied_point):
    points = [varied_point, OperatingPoint("pabee", patience=2), OperatingPoint("budgeted", layer=1), None]
    rng = random.Random(0)
    requests = [(rng.sample(SENTENCES, rng.randint(1, 5)), rng.choice(points)) for _ in range(8 * 200)]
    defaults = [OperatingPoint("pcee", tau=varied_point.tau, patience=2), OperatingPoint("full")]

    def answer(texts, point):
        result = runtime.predict(texts, operating_point=point)
        return result.operating_point, [
            (r.exit_layer, r.label_index, r.probabilities.tobytes()) for r in result.predictions
        ]

    expected = {}
    for texts, point in requests:
        for candidate in [point] if point else defaults:
            used, rows = answer(texts, candidate)
            expected[(tuple(texts), used)] = rows
    results = [None] * len(requests)
    runtime.set_operating_point(defaults[0])

    def worker(offset):
        for index in range(offset, len(requests), 8):
            results[index] = answer(*requests[index])
            if index % 97 == 0:
                runtime.set_operating_point(defaults[(index // 97) % 2])

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    used_defaults = set()
    for (texts, point), (used, rows) in zip(requests, results):
        if point is None:
            used_defaults.add(used)
        assert rows == expected[(tuple(texts), used)]
    assert len(used_defaults) == 2


def test_switch_to_a_point_saved_in_the_manifest(bundle, runtime):
    assert runtime.set_operating_point("default").name == "default"
    with pytest.raises(PolicyError, match="no operating point named 'peak'"):
        runtime.set_operating_point("peak")


def test_pairs_ids_and_truncation(runtime, pair_runtime):
    pair = pair_runtime.predict(["the movie was good"], text_pairs=["a dull story"]).predictions[0]
    assert pair.exit_layer >= 1
    long_text = " ".join(["good"] * 200)
    assert runtime.predict([long_text]).predictions[0].truncated
    assert not runtime.predict(["good"]).predictions[0].truncated
    ids = runtime.tokenizer.encode_texts(["the movie was good"]).input_ids[0].tolist()
    by_ids = runtime.predict_ids([ids], operating_point=OperatingPoint("full")).predictions[0]
    by_text = runtime.predict(["the movie was good"], operating_point=OperatingPoint("full")).predictions[0]
    np.testing.assert_allclose(by_ids.probabilities, by_text.probabilities, atol=1e-6)
    assert runtime.predict_ids([list(range(5, 10)) * 30]).predictions[0].truncated


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: r.predict([""]), "empty"),
        (lambda r: r.predict(["   "]), "empty"),
        (lambda r: r.predict([None]), "NoneType"),
        (lambda r: r.predict(None), "list of strings"),
        (lambda r: r.predict([]), "empty"),
        (lambda r: r.predict([3]), "int"),
        (lambda r: r.predict_ids([[1, 2, 99999]]), "outside the vocabulary"),
        (lambda r: r.predict_ids([[]]), "non-empty"),
        (lambda r: r.predict_ids([["a"]]), "integers"),
        (lambda r: r.predict(["ok"], batch_size=0), "batch_size"),
    ],
)
def test_bad_input_gets_a_clear_error(runtime, call, message):
    with pytest.raises(InputError, match=message):
        call(runtime)


def break_bundle(source, target, how):
    shutil.copytree(source, target)
    manifest_path = target / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    if how == "missing graph":
        (target / "onnx" / "layer_02.onnx").unlink()
    elif how == "flipped bytes":
        path = target / "onnx" / "layer_01.onnx"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "hash mismatch":
        manifest["graphs"]["layers"][0]["sha256"] = "0" * 64
    elif how == "newer format":
        manifest["format_version"] = FORMAT_VERSION + 1
    elif how == "no manifest":
        manifest_path.unlink()
        return target
    elif how == "not json":
        manifest_path.write_text("{")
        return target
    manifest_path.write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing graph", "missing onnx/layer_02.onnx"),
        ("flipped bytes", "sha256 does not match"),
        ("hash mismatch", "sha256 does not match"),
        ("newer format", f"format_version {FORMAT_VERSION + 1} is not supported"),
        ("no manifest", "not a pcee bundle"),
        ("not json", "not valid JSON"),
    ],
)
def test_broken_bundles_fail_at_load_time(bundle, tmp_path, how, message):
    with pytest.raises(BundleError, match=message):
        EarlyExitRuntime.from_bundle(break_bundle(bundle, tmp_path / "broken", how))


def test_corrupt_graph_without_hash_check_still_fails_at_load(bundle, tmp_path):
    broken = break_bundle(bundle, tmp_path / "broken", "missing graph")
    (broken / "onnx" / "layer_02.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(BundleError, match="cannot be loaded by onnxruntime"):
        EarlyExitRuntime.from_bundle(broken, verify_hashes=False)


def test_predict_cli_writes_json_lines(bundle, tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the movie was good\n\na dull story\n")
    output = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        predict_cli,
        [
            str(bundle),
            "--input",
            str(inputs),
            "--policy",
            "budgeted",
            "--layer",
            "2",
            "--output",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and rows[1] == {"line": 2, "error": "blank line: nothing to classify"}
    assert rows[0]["exit_layer"] == rows[2]["exit_layer"] == 2
    assert set(rows[0]) == {
        "label",
        "label_index",
        "probabilities",
        "exit_layer",
        "exit_signal",
        "exit_signal_name",
        "truncated",
    }


def test_predict_cli_bad_policy_is_a_clear_error(bundle):
    result = CliRunner().invoke(predict_cli, [str(bundle), "--text", "good", "--policy", "pcee"])
    assert result.exit_code != 0 and "finite tau" in result.output and "Traceback" not in result.output
