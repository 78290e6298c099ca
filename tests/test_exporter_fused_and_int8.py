"""Speed work: fused layer graphs (the single graph's fusions per layer, parity at 1e-4), the portable path,
int8 bundles (agreement recorded and enforced; runtime, calibration and eval unchanged), format versions.

Tiny random models, exported once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from bundles import SENTENCES  # noqa: E402
from tiny_models import make_tiny_model_dir  # noqa: E402

from pcee.calibration.cli import calibrate_main, eval_main  # noqa: E402
from pcee.exporter.bundle import ExportOptions, export_bundle  # noqa: E402
from pcee.exporter.errors import ExportError  # noqa: E402
from pcee.exporter.optimize import CONTRIB_DOMAIN  # noqa: E402
from pcee.exporter.options import FP32_TOLERANCE  # noqa: E402
from pcee.exporter.quantize import AgreementError  # noqa: E402
from pcee.runtime import MANIFEST_NAME, BundleError, EarlyExitRuntime, Manifest  # noqa: E402

EMBEDDINGS_ONLY = {
    "EmbedLayerNormalization"
}  # fused from the single graph's embeddings, which layer graphs do not hold


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speed")
    return {model_type: sst2_model_dir(root, model_type) for model_type in ("bert", "roberta", "distilbert")}


def sst2_model_dir(root: Path, model_type: str) -> Path:
    """A tiny model whose labels carry SST-2's names, as pcee-train writes them for GLUE data."""
    model_dir = make_tiny_model_dir(root, model_type=model_type, task="sst2")
    config = json.loads((model_dir / "config.json").read_text())
    config["pcee"]["label_names"] = ["negative", "positive"]
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def fused_bundles(model_dirs) -> dict[str, Manifest]:
    return {
        model_type: export_bundle(
            model_dir,
            model_dir.with_name(model_dir.name + "-fused"),
            ExportOptions(with_full_graph=True, fuse=True),
        ).manifest
        for model_type, model_dir in model_dirs.items()
    }


@pytest.fixture(scope="module")
def parity_data(tmp_path_factory) -> Path:
    """A GLUE-format SST-2 dev file (sentence, label)."""
    path = tmp_path_factory.mktemp("sst2") / "dev.tsv"
    path.write_text(
        "sentence\tlabel\n" + "".join(f"{text}\t{index % 2}\n" for index, text in enumerate(SENTENCES))
    )
    return path


@pytest.fixture(scope="module")
def int8_bundle(model_dirs, parity_data) -> Path:
    model_dir = model_dirs["bert"]
    options = ExportOptions(quantize="int8", parity_data=parity_data)
    return export_bundle(model_dir, model_dir.with_name(model_dir.name + "-int8"), options).bundle_dir


# ------------------------------------------------------------------ fused graphs


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_every_layer_graph_has_the_fused_operators_the_single_graph_has_per_layer(fused_bundles, model_type):
    manifest = fused_bundles[model_type]
    single = {
        name: count
        for name, count in manifest.full_graph.fused_operators.items()
        if name not in EMBEDDINGS_ONLY
    }
    assert "BiasGelu" in single
    for layer in manifest.layers:
        assert {
            name: count * manifest.model.num_layers for name, count in layer.fused_operators.items()
        } == single, layer.file


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_bert_style_attention_is_one_fused_node_per_layer(fused_bundles, model_type):
    assert all(layer.fused_operators.get("Attention") == 1 for layer in fused_bundles[model_type].layers)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_fused_graphs_keep_float32_parity_with_pytorch(fused_bundles, model_type):
    parity = fused_bundles[model_type].parity
    assert parity.passed and parity.tolerance == FP32_TOLERANCE
    assert (
        max(diff for outputs in parity.max_abs_diff.values() for diff in outputs.values()) <= FP32_TOLERANCE
    )


def contrib_operators(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node if node.domain == CONTRIB_DOMAIN]


def test_no_fuse_writes_portable_graphs_for_tensorrt(model_dirs, tmp_path):
    result = export_bundle(model_dirs["bert"], tmp_path / "portable", ExportOptions(fuse=False))
    assert all(contrib_operators(result.bundle_dir / layer.file) == [] for layer in result.manifest.layers)
    assert all(layer.fused_operators == {} for layer in result.manifest.layers)
    assert not ExportOptions(tensorrt=True, fuse=True).fuses and not ExportOptions(fp16=True, fuse=True).fuses
    assert not ExportOptions(opset=14, fuse=True).fuses


def test_float_and_int8_bundles_are_fused_by_default_and_portable_on_request():
    assert ExportOptions().fuses and ExportOptions(quantize="int8").fuses
    assert not ExportOptions(fuse=False).fuses and not ExportOptions(quantize="int8", fuse=False).fuses


# ------------------------------------------------------------------ int8


def test_int8_agreement_and_accuracy_are_recorded(int8_bundle, parity_data):
    manifest = Manifest.load(int8_bundle)
    quantization = manifest.quantization
    assert manifest.model.precision == "int8"
    assert quantization.rows == len(SENTENCES) + len(
        SENTENCES
    )  # the built-in sentences and the --parity-data rows
    assert (
        len(quantization.agreement)
        == len(quantization.accuracy)
        == len(quantization.float_accuracy)
        == manifest.model.num_layers
    )
    assert quantization.agreement[-1] >= quantization.min_agreement
    assert quantization.parity_data == str(parity_data)
    for layer in manifest.layers:
        assert {"QAttention", "MatMulInteger"} <= set(layer.fused_operators)


def test_int8_exit_heads_stay_float_as_the_manifest_says(int8_bundle):
    from pcee.exporter.optimize import exit_head_nodes

    manifest = Manifest.load(int8_bundle)
    assert manifest.quantization.float_exit_heads
    for layer in manifest.layers:
        head = {node.op_type for node in exit_head_nodes(onnx.load(str(int8_bundle / layer.file)).graph)}
        assert head & {"Gemm", "MatMul"} and not head & {"MatMulInteger", "DynamicQuantizeLinear"}, (
            layer.file,
            head,
        )


def test_a_quantizer_that_quantizes_the_head_anyway_fails_the_export(model_dirs, tmp_path, monkeypatch):
    from pcee.exporter import optimize

    monkeypatch.setattr(
        optimize,
        "float_head_exclusions",
        lambda graph: [node.name for node in optimize.exit_head_nodes(graph)],
    )
    with pytest.raises(ExportError, match="into the exit head of layer_01.onnx"):
        export_bundle(model_dirs["bert"], tmp_path / "int8", ExportOptions(quantize="int8"))
    assert not (tmp_path / "int8").exists()


def test_int8_export_fails_below_the_agreement_threshold_and_keeps_the_previous_bundle(
    model_dirs, tmp_path, monkeypatch
):
    output = tmp_path / "int8"
    export_bundle(model_dirs["bert"], output, ExportOptions(fuse=False))
    before = (output / MANIFEST_NAME).read_text()

    def opposite_labels(model, batch):  # a float model that never agrees with the int8 chain
        return 1 - record_labels(model, batch)

    from pcee.exporter import bundle as bundle_module

    record_labels = bundle_module.torch_exit_labels
    monkeypatch.setattr(bundle_module, "torch_exit_labels", opposite_labels)
    with pytest.raises(AgreementError, match="--min-agreement") as error:
        export_bundle(model_dirs["bert"], output, ExportOptions(quantize="int8"))
    assert isinstance(error.value, ExportError)
    assert (output / MANIFEST_NAME).read_text() == before


@pytest.mark.parametrize(
    "options, says",
    [
        (dict(quantize="int8", fp16=True), "--fp16"),
        (dict(quantize="int4"), "int4"),
        (dict(parity_data=Path("rows.tsv")), "--quantize int8"),
    ],
)
def test_bad_quantization_options_fail_before_any_work(model_dirs, tmp_path, options, says):
    with pytest.raises(ExportError, match=says):
        export_bundle(model_dirs["bert"], tmp_path / "never", ExportOptions(**options))
    assert not (tmp_path / "never").exists()


def test_runtime_calibration_and_eval_run_an_int8_bundle(int8_bundle, parity_data, tmp_path):
    bundle = Path(shutil.copytree(int8_bundle, tmp_path / "bundle"))
    with EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu") as runtime:
        result = runtime.predict(SENTENCES, operating_point="default")
    assert len(result.predictions) == len(SENTENCES)
    data = ["--data", str(parity_data), "--task", "sst2", "--backend", "onnxruntime-cpu"]
    calibrated = CliRunner().invoke(
        calibrate_main, [str(bundle), *data, "--target-speedup", "0.3", "--name", "fast", "--no-progress"]
    )
    assert calibrated.exit_code == 0, calibrated.output
    evaluated = CliRunner().invoke(eval_main, [str(bundle), *data, "--holdout-of", "fast", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["layer_speedup"] >= 0


# ------------------------------------------------------------------ session settings of the chain


def optimized_operators(path: Path, options, open_with) -> set[str]:
    """The operator types left after onnxruntime's session-level optimizations of the graph at `path`."""
    saved = path.with_name(path.stem + ".optimized.onnx")
    options.optimized_model_filepath = str(saved)
    open_with(path, options)
    operators = {node.op_type for node in onnx.load(str(saved)).graph.node}
    saved.unlink()
    return operators


def test_cpu_layer_sessions_leave_residual_layer_norms_unfused(int8_bundle):
    import onnxruntime as ort

    from pcee.runtime.backends.onnxruntime_cpu import cpu_session_options, open_session

    layer = int8_bundle / Manifest.load(int8_bundle).layers[0].file
    by_default = optimized_operators(
        layer, ort.SessionOptions(), lambda path, options: ort.InferenceSession(str(path), options)
    )
    assert (
        "SkipLayerNormalization" in by_default
    )  # onnxruntime fuses it on its own: the setting is not vacuous
    runtime_opened = optimized_operators(
        layer,
        cpu_session_options(1),
        lambda path, options: open_session(path, options, ["CPUExecutionProvider"]),
    )
    assert "SkipLayerNormalization" not in runtime_opened and "LayerNormalization" in runtime_opened


def test_the_chain_sessions_share_one_arena_and_cuda_sessions_do_not_opt_in(int8_bundle):
    from pcee.runtime.backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, cpu_session_options

    backend = OnnxRuntimeCpuBackend(Manifest.load(int8_bundle).graph_chain(int8_bundle), intra_op_threads=1)
    sessions = [backend.embeddings[0], *(session for session, _ in backend.layers)]
    assert {
        session.get_session_options().get_session_config_entry("session.use_env_allocators")
        for session in sessions
    } == {"1"}
    with pytest.raises(RuntimeError, match="does not have configuration"):
        cpu_session_options(1, share_arena=False).get_session_config_entry("session.use_env_allocators")


# ------------------------------------------------------------------ format versions


def edit_manifest(bundle: Path, edit) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    edit(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def test_a_bundle_of_the_previous_format_fails_naming_its_version(int8_bundle, tmp_path):
    bundle = Path(shutil.copytree(int8_bundle, tmp_path / "old"))
    edit_manifest(bundle, lambda data: data.update(format_version=1))
    with pytest.raises(BundleError, match="format_version 1 is not supported .*reads version 2"):
        Manifest.load(bundle)


def test_an_int8_manifest_without_its_quantization_block_is_refused(int8_bundle, tmp_path):
    bundle = Path(shutil.copytree(int8_bundle, tmp_path / "stripped"))
    edit_manifest(bundle, lambda data: data.pop("quantization"))
    with pytest.raises(BundleError, match="quantization block is absent"):
        Manifest.load(bundle)


def test_a_version_2_manifest_without_fused_operator_counts_still_loads(fused_bundles, model_dirs, tmp_path):
    source = model_dirs["bert"].with_name(model_dirs["bert"].name + "-fused")
    bundle = Path(shutil.copytree(source, tmp_path / "before-fusion-counts"))
    edit_manifest(bundle, lambda data: [graph.pop("fused_operators") for graph in data["graphs"]["layers"]])
    assert all(layer.fused_operators == {} for layer in Manifest.load(bundle).layers)
