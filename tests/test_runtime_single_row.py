"""The compiled single-row graph: one onnxruntime call per row, the chain's exits on every row and policy."""

from __future__ import annotations

import numpy as np
import pytest
from bundles import SENTENCES

from pcee.runtime import EarlyExitRuntime, OperatingPoint


@pytest.fixture(scope="module")
def runtime(tiny_bundles):
    bundle = tiny_bundles.bundle(exit_pooling="mean", learned_confidence=True, num_layers=4)
    with EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu", intra_op_threads=1) as runtime:
        yield runtime


def points(runtime) -> list[OperatingPoint]:
    """Every policy, with thresholds AT observed exit values (the strict comparisons' edge) and between them."""
    exits = runtime.run_all_exits(runtime.tokenizer.encode_texts(SENTENCES))
    chosen = []
    for quantile in (0.2, 0.5, 0.8):
        entropy = float(np.quantile(exits.entropy, quantile, method="nearest"))
        probability = float(np.quantile(exits.max_probability, quantile, method="nearest"))
        score = float(np.quantile(exits.confidence_score, quantile, method="nearest"))
        for patience in (1, 2):
            chosen += [
                OperatingPoint("pcee", tau=entropy, patience=patience),
                OperatingPoint("pcee", tau=entropy, patience=patience, ensemble=True),
                OperatingPoint("pcee-maxprob", tau=probability, patience=patience),
                OperatingPoint("pcee-learned", tau=score, patience=patience),
            ]
        chosen += [
            OperatingPoint("branchynet", tau=entropy),
            OperatingPoint("shallow-deep", tau=probability, ensemble=True),
        ]
    chosen += [OperatingPoint("pabee", patience=p) for p in (1, 2, 3)]
    chosen += [OperatingPoint("budgeted", layer=layer) for layer in (1, 2, 4)] + [OperatingPoint("full")]
    return chosen


def one_row_at_a_time(runtime, point, compiled: bool):
    runtime.backend.use_single_row_graph = compiled
    try:
        batch = runtime.tokenizer.encode_texts(SENTENCES)
        return [
            runtime.predict_encoded(batch.select(np.array([row])), point).predictions[0]
            for row in range(len(batch))
        ]
    finally:
        runtime.backend.use_single_row_graph = True


def test_the_compiled_graph_exits_where_the_chain_exits_for_every_policy(runtime):
    exit_layers = set()
    for point in points(runtime):
        chain = one_row_at_a_time(runtime, point, compiled=False)
        compiled = one_row_at_a_time(runtime, point, compiled=True)
        for expected, got in zip(chain, compiled):
            assert got.exit_layer == expected.exit_layer, point.describe()
            assert got.label == expected.label, point.describe()
            np.testing.assert_allclose(
                got.probabilities, expected.probabilities, atol=1e-6, err_msg=point.describe()
            )
            np.testing.assert_allclose(
                got.exit_signal, expected.exit_signal, atol=1e-6, err_msg=point.describe()
            )
        exit_layers.update(prediction.exit_layer for prediction in compiled)
    assert exit_layers == {1, 2, 3, 4}  # the points really exercise every branch


def test_a_single_row_is_one_onnxruntime_call(runtime, monkeypatch):
    for session, _ in runtime.backend.layers:
        monkeypatch.setattr(session, "run", None)  # the chain's sessions must not be called
    row = runtime.tokenizer.encode_texts(SENTENCES[:1])
    assert runtime.predict_encoded(row).predictions[0].exit_layer >= 1


def test_batches_still_run_the_chain(runtime):
    batch = runtime.tokenizer.encode_texts(SENTENCES)
    point = OperatingPoint("pabee", patience=1)
    together = runtime.predict_encoded(batch, point).predictions
    alone = one_row_at_a_time(runtime, point, compiled=True)
    assert [p.exit_layer for p in together] == [p.exit_layer for p in alone]


def all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from all_nodes(attribute.g)


def test_what_every_layer_derives_from_the_mask_is_computed_once(runtime):
    import onnx

    from pcee.runtime.single_row import ExitRule
    from pcee.runtime.single_row_compose import compose_single_row_graph

    chain = runtime.manifest.graph_chain(runtime.bundle_dir)
    layer_clips = [n for n in onnx.load(str(chain.layers[0].path)).graph.node if n.op_type == "Clip"]
    composed = compose_single_row_graph(chain, ExitRule("entropy"))
    assert len(layer_clips) == 1  # the pooling's row length, in every layer graph
    assert [n.op_type for n in all_nodes(composed.graph)].count("Clip") == 1
    assert [n.op_type for n in all_nodes(composed.graph)].count("If") == runtime.num_layers - 1


def test_the_real_data_check_compares_every_point_and_finds_no_difference(runtime, tmp_path):
    import json

    from click.testing import CliRunner

    from pcee.benchmarks.single_row_check import main as check_cli

    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{text}\t1\n" for text in SENTENCES))
    result = CliRunner().invoke(check_cli, [str(runtime.bundle_dir), "--data", str(data), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == len(SENTENCES) and report["rows_that_differ"] == 0
    assert any(
        label.startswith("pcee-learned") for label in report["per_point"]
    )  # the tiny model has a score
    assert len(report["per_point"]) == report["points"]


@pytest.mark.parametrize("layers", [1, 3, 4])
def test_the_truncated_graph_gives_the_chains_exit_at_its_last_layer(runtime, layers):
    from pcee.runtime import compose_truncated_model

    chain = runtime.manifest.graph_chain(runtime.bundle_dir)
    batch = runtime.tokenizer.encode_texts(SENTENCES)
    expected = runtime.run_all_exits(batch)
    outputs = run_model(compose_truncated_model(chain, layers), {}, batch)
    assert set(outputs) == {"logits", "normalized_entropy", "max_probability", "confidence_score"}
    np.testing.assert_allclose(outputs["logits"], expected.logits[:, layers - 1], atol=1e-5)
    np.testing.assert_allclose(outputs["normalized_entropy"], expected.entropy[:, layers - 1], atol=1e-5)


def test_a_truncation_keeps_one_to_all_layers(runtime):
    from pcee.runtime import PolicyError, compose_truncated_model

    chain = runtime.manifest.graph_chain(runtime.bundle_dir)
    for layers in (0, runtime.num_layers + 1):
        with pytest.raises(PolicyError, match=f"1 to {runtime.num_layers} layers, not {layers}"):
            compose_truncated_model(chain, layers)


def test_a_fixed_exit_layer_runs_the_chain_cut_there_with_no_decisions(runtime):
    from pcee.runtime.single_row import LAYER_TEST, ExitRule, exit_rule
    from pcee.runtime.single_row_compose import compose_single_row_graph

    chain = runtime.manifest.graph_chain(runtime.bundle_dir)
    for point, layer in [
        (OperatingPoint("budgeted", layer=2), 2),
        (OperatingPoint("full"), runtime.num_layers),
    ]:
        rule, _, _ = exit_rule(runtime.make_policy(point))
        assert rule == ExitRule(LAYER_TEST, layer=layer)
        graph = compose_single_row_graph(chain, rule).graph
        assert "If" not in {node.op_type for node in graph.node}
        assert {graph_input.name for graph_input in graph.input} == set(chain.embeddings.spec.input_names)


def run_model(model: bytes, thresholds: dict, batch) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    feeds = {name: getattr(batch, name) for name in names if hasattr(batch, name)} | thresholds
    return dict(zip([output.name for output in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize(
    "point", [OperatingPoint("pcee", tau=0.5, patience=2, ensemble=True), OperatingPoint("pabee", patience=2)]
)
def test_the_unrolled_graph_reports_what_the_compiled_one_does_for_a_row_leaving_at_its_depth(runtime, point):
    import onnx

    from pcee.runtime import compose_single_row_model

    chain = runtime.manifest.graph_chain(runtime.bundle_dir)
    policy = runtime.make_policy(point)
    compiled, thresholds = compose_single_row_model(chain, policy)
    assert set(thresholds) == {"exit_tau", "exit_patience"}
    compared = 0
    for text in SENTENCES:
        row = runtime.tokenizer.encode_texts([text])
        expected = run_model(compiled, thresholds, row)
        depth = int(expected["exit_layer"][0])
        unrolled, _ = compose_single_row_model(chain, policy, unrolled_layers=depth)
        assert "If" not in {node.op_type for node in onnx.load_from_string(unrolled).graph.node}
        got = run_model(unrolled, thresholds, row)
        assert set(got) == set(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} at depth {depth}")
        compared += 1
    assert compared == len(SENTENCES)


def test_an_unrolled_graph_runs_one_to_all_layers_of_a_policy_that_has_a_graph(runtime):
    from pcee.runtime import PolicyError, compose_single_row_model

    chain = runtime.manifest.graph_chain(runtime.bundle_dir)
    policy = runtime.make_policy(OperatingPoint("pcee", tau=0.5, patience=1))
    for layers in (0, runtime.num_layers + 1):
        with pytest.raises(PolicyError, match=f"1 to {runtime.num_layers} layers, not {layers}"):
            compose_single_row_model(chain, policy, unrolled_layers=layers)
    model, thresholds = compose_single_row_model(
        chain, runtime.make_policy(OperatingPoint("budgeted", layer=2))
    )
    assert thresholds == {}
    assert run_model(model, thresholds, runtime.tokenizer.encode_texts(SENTENCES[:1]))["logits"].shape == (
        1,
        2,
    )
