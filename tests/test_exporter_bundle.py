"""pcee-export on tiny random models of every supported architecture."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from tiny_models import HIDDEN_SIZE, make_tiny_model_dir

from pcee.exporter import bundle as bundle_module
from pcee.exporter.bundle import ExportOptions, export_bundle
from pcee.exporter.cli import main as export_cli
from pcee.exporter.errors import OpsetError, OutputDirectoryError, ParityError, TensorRTUnavailableError
from pcee.exporter.graph_export import export_full_graph
from pcee.exporter.options import FP16_TOLERANCE, FP32_TOLERANCE
from pcee.exporter.tensorrt import ShapeRange, gpu_name, require_tensorrt
from pcee.modeling.adapters import attention_bias
from pcee.modeling.errors import ModelDirectoryError, UnsupportedArchitectureError
from pcee.modeling.model import MultiExitClassifier
from pcee.runtime import MANIFEST_NAME, Manifest, OperatingPoint
from pcee.runtime.backends.onnxruntime_cpu import cpu_session_options
from pcee.runtime.graphs import BATCH, SEQUENCE, TensorSpec, layer_spec

# (architecture, exit pooling, learned confidence, task): every architecture, both poolings, one learned head, one pair task
CONFIGURATIONS = [
    ("bert", "cls", False, None),
    ("roberta", "mean", True, None),
    ("albert", "cls", False, None),
    ("distilbert", "mean", False, None),
    ("bert", "mean", False, "mrpc"),
]
NUM_LAYERS = 3


def quiet() -> ExportOptions:
    return ExportOptions(progress=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[tuple, tuple[Path, bundle_module.ExportResult]]:
    """Each configuration exported once: (model_dir, result), shared by the tests below."""
    root = tmp_path_factory.mktemp("exported")
    results = {}
    for architecture, pooling, learned, task in CONFIGURATIONS:
        model_dir = make_tiny_model_dir(
            root / f"{architecture}-{pooling}-{task}",
            model_type=architecture,
            exit_pooling=pooling,
            learned_confidence=learned,
            num_layers=NUM_LAYERS,
            task=task,
        )
        results[(architecture, pooling, learned, task)] = (
            model_dir,
            export_bundle(model_dir, options=quiet()),
        )
    return results


def manifest_json(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / MANIFEST_NAME).read_text())


# -- every architecture exports and matches PyTorch --------------------------------------------------
@pytest.mark.parametrize(
    "configuration", CONFIGURATIONS, ids=lambda c: "-".join(str(part) for part in c if part)
)
def test_export_passes_parity_and_checker(exported, configuration):
    model_dir, result = exported[configuration]
    architecture, pooling, learned, task = configuration
    parity = result.manifest.parity
    assert result.bundle_dir == model_dir.resolve().with_name(model_dir.name + "-pcee")
    assert parity.passed and parity.tolerance == FP32_TOLERANCE
    assert sorted(parity.max_abs_diff) == [f"layer_{index:02d}" for index in range(1, NUM_LAYERS + 1)]
    expected_outputs = {"logits", "normalized_entropy", "max_probability"} | (
        {"confidence_score"} if learned else set()
    )
    for diffs in parity.max_abs_diff.values():
        assert set(diffs) == expected_outputs
        assert max(diffs.values()) <= FP32_TOLERANCE
    assert set(parity.batch_sizes) >= {1, 4, 8}
    for graph in result.manifest.graph_files():
        onnx.checker.check_model(str(result.bundle_dir / graph.file), full_check=True)
    info = result.manifest.model
    assert (info.architecture, info.num_layers, info.hidden_size) == (architecture, NUM_LAYERS, HIDDEN_SIZE)
    assert (info.exit_pooling, info.learned_confidence, info.precision) == (pooling, learned, "fp32")
    assert info.uses_token_type_ids == (architecture != "distilbert")
    assert info.task_type == ("sentence_pair" if task == "mrpc" else "single_sentence")


def test_bundle_layout_and_default_operating_point(exported):
    _, result = exported[CONFIGURATIONS[0]]
    files = set(result.file_sizes)
    layers = {f"onnx/layer_{index:02d}.onnx" for index in range(1, NUM_LAYERS + 1)}
    assert {MANIFEST_NAME, "onnx/embeddings.onnx", "tokenizer/tokenizer.json"} | layers <= files
    assert not any(name.startswith("trt/") or name == "onnx/full_model.onnx" for name in files)
    point = result.manifest.operating_point
    assert point == OperatingPoint(
        "pcee", tau=0.3, patience=2, name="default", source="export default (uncalibrated)"
    )
    assert result.manifest.operating_points == [point]


def test_manifest_round_trips(exported):
    for _, result in exported.values():
        written = manifest_json(result.bundle_dir)
        loaded = Manifest.load(result.bundle_dir)
        assert loaded.to_dict() == written
        assert loaded == result.manifest


def test_layer_graph_runs_at_other_batch_and_sequence_sizes(exported):
    """The dynamic axes are real: one layer graph at two shapes it was not traced at, against PyTorch."""
    model_dir, result = exported[("distilbert", "mean", False, None)]
    model = MultiExitClassifier.from_pretrained(model_dir)
    session = ort.InferenceSession(
        str(result.bundle_dir / result.manifest.layers[1].file),
        cpu_session_options(),
        providers=["CPUExecutionProvider"],
    )
    generator = torch.Generator().manual_seed(0)
    for batch, length in [(1, 3), (7, 29)]:
        hidden = torch.randn(batch, length, HIDDEN_SIZE, generator=generator)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[-1, length // 2 + 1 :] = 0
        bias = attention_bias(mask, torch.float32)
        next_hidden, logits, entropy, max_probability = session.run(
            None, {"hidden_states": hidden.numpy(), "attention_bias": bias.numpy()}
        )
        assert next_hidden.shape == (batch, length, HIDDEN_SIZE) and logits.shape == (batch, 2)
        assert entropy.shape == max_probability.shape == (batch,)
        with torch.no_grad():
            expected_hidden = model.run_layer(1, hidden, bias)
            expected_logits, _ = model.exit_head(1, expected_hidden, mask)
        np.testing.assert_allclose(next_hidden, expected_hidden.numpy(), atol=1e-5)
        np.testing.assert_allclose(logits, expected_logits.numpy(), atol=FP32_TOLERANCE)


# -- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [14, 20])
def test_supported_opset_range_exports(tmp_path, opset):
    model_dir = make_tiny_model_dir(tmp_path, model_type="bert", num_layers=2)
    result = export_bundle(model_dir, options=ExportOptions(opset=opset))
    assert onnx.load(str(result.bundle_dir / "onnx/layer_01.onnx")).opset_import[0].version == opset


def test_fp16_keeps_a_float32_interface_within_fp16_tolerance(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, model_type="bert", exit_pooling="mean", num_layers=2)
    result = export_bundle(model_dir, options=ExportOptions(fp16=True, max_seq_len=32))
    parity = result.manifest.parity
    assert result.manifest.model.precision == "fp16" and result.manifest.model.max_seq_len == 32
    assert parity.tolerance == FP16_TOLERANCE and parity.passed
    assert max(parity.sequence_lengths) <= 32
    for graph in result.manifest.graph_files():
        assert {tensor.dtype for tensor in graph.spec.inputs + graph.spec.outputs} <= {"int64", "float32"}
    weights = onnx.load(str(result.bundle_dir / "onnx/layer_01.onnx")).graph.initializer
    assert {weight.data_type for weight in weights} == {onnx.TensorProto.FLOAT16}


def test_full_graph_is_exported_and_verified(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, model_type="roberta", num_layers=2)
    result = export_bundle(model_dir, options=ExportOptions(with_full_graph=True))
    assert result.manifest.full_graph.file == "onnx/full_model.onnx"
    assert result.manifest.parity.max_abs_diff["full"]["logits"] <= FP32_TOLERANCE

    standalone = export_full_graph(model_dir, tmp_path / "bench" / "full.onnx")
    session = ort.InferenceSession(str(standalone), cpu_session_options(), providers=["CPUExecutionProvider"])
    ids = np.array([[2, 30, 31, 32, 3, 0]], dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": (ids != 0).astype(np.int64),
        "token_type_ids": np.zeros_like(ids),
    }
    (logits,) = session.run(None, feeds)
    model = MultiExitClassifier.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model(**{name: torch.from_numpy(values) for name, values in feeds.items()}).logits[-1]
    np.testing.assert_allclose(logits, expected.numpy(), atol=FP32_TOLERANCE)


# -- atomic replacement and parity failures ----------------------------------------------------------
def perturb_reference(monkeypatch, layers: set[int]) -> None:
    """Make the PyTorch reference disagree with the exported graphs at the given 0-based layers."""
    original = bundle_module.torch_exit_outputs

    def perturbed(model, batch):
        outputs = original(model, batch)
        for index in layers:
            outputs[index]["logits"] = outputs[index]["logits"] + 0.5
        return outputs

    monkeypatch.setattr(bundle_module, "torch_exit_outputs", perturbed)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file()
    }


def test_parity_failure_names_every_failing_layer_and_keeps_the_previous_bundle(tmp_path, monkeypatch):
    model_dir = make_tiny_model_dir(tmp_path, model_type="bert", num_layers=3)
    output = tmp_path / "bundle"
    export_bundle(model_dir, output, quiet())
    before = snapshot(output)

    perturb_reference(monkeypatch, {0, 2})
    with pytest.raises(ParityError) as raised:
        export_bundle(model_dir, output, ExportOptions(with_full_graph=True))
    failing = {(mismatch.graph, mismatch.output) for mismatch in raised.value.mismatches}
    assert failing == {("layer_01", "logits"), ("layer_03", "logits"), ("full", "logits")}
    assert "layer_01 logits" in str(raised.value) and "layer_03 logits" in str(raised.value)
    assert snapshot(output) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "bundle",
        model_dir.name,
    ]  # no staging left behind


def test_successful_export_replaces_an_existing_bundle(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, model_type="albert", num_layers=2)
    output = tmp_path / "bundle"
    export_bundle(model_dir, output, ExportOptions(with_full_graph=True))
    (output / "onnx/stale.onnx").write_text("from an older export")
    result = export_bundle(model_dir, output, quiet())
    assert not (output / "onnx/stale.onnx").exists() and not (output / "onnx/full_model.onnx").exists()
    assert Manifest.load(output) == result.manifest
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle", model_dir.name]


def test_an_empty_output_directory_is_filled(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, model_type="distilbert", num_layers=2)
    (tmp_path / "empty").mkdir()
    assert Manifest.load(export_bundle(model_dir, tmp_path / "empty", quiet()).bundle_dir)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("bad-input"), model_type="bert", num_layers=2)


def copy_model_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        export_bundle(tmp_path / "nowhere", tmp_path / "out", quiet())


def test_corrupt_config(tmp_path, tiny_model_dir):
    broken = copy_model_dir(tiny_model_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelDirectoryError, match="not valid JSON"):
        export_bundle(broken, options=quiet())


def test_corrupt_weights(tmp_path, tiny_model_dir):
    broken = copy_model_dir(tiny_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelDirectoryError, match="corrupt"):
        export_bundle(broken, options=quiet())


def test_missing_tokenizer_json(tmp_path, tiny_model_dir):
    broken = copy_model_dir(tiny_model_dir, tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelDirectoryError, match="no tokenizer.json"):
        export_bundle(broken, options=quiet())


def test_unsupported_architecture(tmp_path, tiny_model_dir):
    broken = copy_model_dir(tiny_model_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        export_bundle(broken, options=quiet())


@pytest.mark.parametrize("opset", [13, 21])
def test_unsupported_opset_fails_before_any_work(tmp_path, opset):
    with pytest.raises(
        OpsetError, match=f"--opset {opset} is not supported; pcee-export writes opsets 14 to 20"
    ):
        export_bundle(tmp_path / "not-even-read", options=ExportOptions(opset=opset))


def test_non_bundle_output_directory_is_refused(tmp_path, tiny_model_dir):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirectoryError, match="not a pcee bundle; refusing to replace it"):
        export_bundle(tiny_model_dir, precious, quiet())
    assert (precious / "notes.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputDirectoryError, match="is a file"):
        export_bundle(tiny_model_dir, tmp_path / "a-file", quiet())


def test_max_seq_len_beyond_the_position_embeddings(tmp_path, tiny_model_dir):
    with pytest.raises(bundle_module.ExportError, match="--max-seq-len 5000 is outside"):
        export_bundle(tiny_model_dir, tmp_path / "out", ExportOptions(max_seq_len=5000))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    gpu_name() is not None, reason="this machine has a GPU; the missing-GPU message cannot be shown"
)
def test_tensorrt_without_gpu_fails_before_any_work(tmp_path):
    with pytest.raises(TensorRTUnavailableError, match="an NVIDIA GPU"):
        export_bundle(tmp_path / "not-even-read", options=ExportOptions(tensorrt=True))


# -- CLI ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{missing}"], "does not exist"),
        (["{model}", "--opset", "12"], "--opset 12 is not supported"),
        (["{model}", "--output", "{precious}"], "not a pcee bundle"),
    ],
)
def test_cli_reports_bad_input_without_a_traceback(tmp_path, tiny_model_dir, arguments, message):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    paths = {"missing": tmp_path / "missing", "model": tiny_model_dir, "precious": precious}
    result = CliRunner().invoke(export_cli, [argument.format(**paths) for argument in arguments])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_cli_json_output(tmp_path, tiny_model_dir):
    output = tmp_path / "bundle"
    result = CliRunner().invoke(
        export_cli, [str(tiny_model_dir), "--output", str(output), "--json", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bundle"] == str(output)
    assert report["files"][MANIFEST_NAME] == (output / MANIFEST_NAME).stat().st_size
    assert report["parity"]["passed"] and set(report["parity"]["max_abs_diff"]) == {"layer_01", "layer_02"}
    assert report["export_seconds"] > 0 and report["tensorrt"] is False


def test_cli_text_output_says_where_the_bundle_went(tmp_path, tiny_model_dir):
    output = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli, [str(tiny_model_dir), "-o", str(output), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"Bundle written to {output}" in result.output and "layer_02" in result.output


# -- TensorRT ----------------------------------------------------------------------------------------
def test_profile_shapes_cover_batch_and_sequence_ranges():
    shape_range = ShapeRange(max_batch_size=32, max_seq_len=128)
    bias = TensorSpec("attention_bias", "float32", (BATCH, 1, 1, SEQUENCE))
    assert shape_range.profile_shapes(bias) == ((1, 1, 1, 1), (16, 1, 1, 64), (32, 1, 1, 128))
    hidden = layer_spec(HIDDEN_SIZE, 2, False).inputs[0]
    assert shape_range.profile_shapes(hidden) == (
        (1, 1, HIDDEN_SIZE),
        (16, 64, HIDDEN_SIZE),
        (32, 128, HIDDEN_SIZE),
    )
    assert ShapeRange(1, 1).profile_shapes(bias)[1] == (1, 1, 1, 1)


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="no NVIDIA GPU / TensorRT here")
def test_tensorrt_engines_are_built_and_recorded(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, model_type="bert", exit_pooling="mean", num_layers=2)
    result = export_bundle(model_dir, options=ExportOptions(tensorrt=True, max_batch_size=8, max_seq_len=64))
    block = result.manifest.tensorrt
    assert block.max_batch_size == 8 and block.max_seq_len == 64 and block.gpu
    assert [entry.file for entry in block.layers] == ["trt/layer_01.engine", "trt/layer_02.engine"]
    assert (result.bundle_dir / "trt/timing.cache").is_file()
    assert Manifest.load(result.bundle_dir).tensorrt == block


def test_bundle_gets_ordinary_permissions(tmp_path):
    """Staging directories and temporary files start private (0700 / 0600); the bundle must not stay so."""
    umask = os.umask(0)
    os.umask(umask)
    bundle = export_bundle(make_tiny_model_dir(tmp_path, num_layers=1), tmp_path / "bundle").bundle_dir
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((bundle / "manifest.json").stat().st_mode) == 0o666 & ~umask
