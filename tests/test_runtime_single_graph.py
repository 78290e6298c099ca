"""The single-graph backend: the bundle's whole-model graph behind the ordinary runtime, full point only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bundles import SENTENCES
from click.testing import CliRunner

from pcee.exporter.bundle import ExportOptions, export_bundle
from pcee.runtime import (
    BundleError,
    EarlyExitRuntime,
    OperatingPoint,
    PolicyError,
    SingleGraphSession,
    softmax,
)
from pcee.runtime.cli import main as predict_cli

BACKEND = "onnxruntime-single-graph"


@pytest.fixture(scope="module")
def model_dir(sst2_model_dir: Path) -> Path:
    return sst2_model_dir


@pytest.fixture(scope="module")
def bundle(sst2_single_graph_bundle: Path) -> Path:
    return sst2_single_graph_bundle


@pytest.fixture(scope="module")
def runtime(bundle: Path):
    with EarlyExitRuntime.from_bundle(bundle, backend=BACKEND) as loaded:
        yield loaded


def test_predictions_equal_the_chain_at_the_full_point(bundle, runtime):
    with EarlyExitRuntime.from_bundle(
        bundle, backend="onnxruntime-cpu", operating_point=OperatingPoint("full")
    ) as chain:
        expected = chain.predict(SENTENCES)
    served = runtime.predict(SENTENCES)
    assert runtime.backend_name == BACKEND and served.operating_point.policy == "full"
    assert served.layers_run == expected.layers_run and served.layer_speedup == 0
    for got, want in zip(served.predictions, expected.predictions):
        np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-5)
        assert (got.label, got.exit_layer) == (want.label, want.exit_layer)
        assert got.exit_signal == pytest.approx(want.exit_signal, abs=1e-5)
        assert got.exit_signal_name == want.exit_signal_name


@pytest.mark.parametrize(
    "point", [OperatingPoint("pcee", tau=0.3, patience=1), OperatingPoint("budgeted", layer=1)]
)
def test_other_points_are_refused(runtime, point):
    with pytest.raises(PolicyError, match="full operating point only"):
        runtime.set_operating_point(point)
    with pytest.raises(PolicyError, match="full operating point only"):
        runtime.predict(["good"], operating_point=point)
    assert runtime.operating_point.policy == "full"


def test_a_bundle_without_a_full_graph_is_refused(model_dir):
    plain = export_bundle(model_dir, model_dir.with_name("chain-only-pcee")).bundle_dir
    with pytest.raises(BundleError, match="--with-full-graph"):
        EarlyExitRuntime.from_bundle(plain, backend=BACKEND)


def test_predict_cli_serves_the_single_graph(bundle, runtime):
    result = CliRunner().invoke(
        predict_cli, [str(bundle), "--text", "the movie was good", "--backend", BACKEND]
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.splitlines()[-1])
    assert row["exit_layer"] == runtime.num_layers


def test_recording_every_exit_needs_a_per_layer_backend(runtime):
    with pytest.raises(PolicyError, match="only the last exit"):
        runtime.run_all_exits(runtime.tokenizer.encode_texts(["good"]))


def test_one_single_graph_runner_serves_the_backend_and_a_graph_outside_a_bundle(bundle, runtime, tmp_path):
    """pcee-bench times its reference copies with the session the backend serves with (and parity checks with)."""
    manifest = runtime.manifest
    rows = runtime.tokenizer.encode_texts(SENTENCES)
    entry = manifest.graph_chain(bundle).full
    copy = tmp_path / "copied.onnx"
    copy.write_bytes(entry.path.read_bytes())
    served = runtime.predict(SENTENCES)
    for session in (SingleGraphSession(entry.path, graph=entry), SingleGraphSession(copy)):
        probabilities = softmax(session.logits(rows))
        np.testing.assert_allclose(
            probabilities, [row.probabilities for row in served.predictions], atol=1e-5
        )


def test_the_single_graph_session_refuses_a_file_that_is_not_the_declared_graph(bundle, runtime):
    chain = runtime.manifest.graph_chain(bundle)
    layer_file_as_full_graph = replace(chain.full, path=chain.layers[0].path)
    with pytest.raises(BundleError, match="does not match the manifest"):
        SingleGraphSession(layer_file_as_full_graph.path, graph=layer_file_as_full_graph)
