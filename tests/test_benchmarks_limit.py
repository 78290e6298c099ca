"""pcee-bench's limit contender (the model truncated to a point's average depth), limit_ratio, and the CPU it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from bundles import SENTENCES  # noqa: E402
from tiny_models import make_tiny_model_dir  # noqa: E402

from pcee.benchmarks.cli import main as bench_cli  # noqa: E402
from pcee.benchmarks.machine import cpu_description, describe_cpu  # noqa: E402
from pcee.benchmarks.truncation import truncated_layers  # noqa: E402
from pcee.exporter.bundle import export_bundle  # noqa: E402


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model dir, a bundle calibrated to a point named half, labelled data)."""
    from pcee.calibration.cli import calibrate_main

    root = tmp_path_factory.mktemp("limit")
    model_dir = make_tiny_model_dir(root, task="sst2", num_layers=4)
    bundle = export_bundle(model_dir).bundle_dir
    data = root / "reviews.csv"
    data.write_text(
        "text,label\n" + "".join(f"{t.replace(',', '')},{i % 2}\n" for i, t in enumerate(SENTENCES))
    )
    result = CliRunner().invoke(
        calibrate_main,
        [str(bundle), *data_arguments(data), "--no-progress", "--target-speedup", "0.5", "--name", "half"],
    )
    assert result.exit_code == 0, result.output
    return model_dir, bundle, data


def data_arguments(data: Path) -> list[str]:
    return ["--data", str(data), "--text-column", "text", "--label-column", "label"]


def test_each_point_is_measured_against_its_truncation(calibrated, tmp_path):
    model_dir, bundle, data = calibrated
    arguments = [
        str(bundle),
        *data_arguments(data),
        "--repeats",
        "1",
        "--batch-sizes",
        "1,4",
        "--no-progress",
    ]
    arguments += ["--model-dir", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--points", "half"]
    clock = ["--clock", "cpu", "--intra-op-threads", "1"]
    result = CliRunner().invoke(bench_cli, [*arguments, *clock, "--quantize", "int8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["clock"] == "cpu"
    assert report["cpu"]["model"] and set(report["cpu"]["flags"]) <= {
        "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
    }  # fmt: skip
    for figures in report["results"].values():
        point = figures["runtime_point_half"]
        layers = truncated_layers(4, point["layer_speedup"])
        assert point["limit"] == f"truncated_{layers}_layers"
        limit = figures[point["limit"]]
        assert point["limit_ratio"] == pytest.approx(
            limit["seconds_per_pass"] / point["seconds_per_pass"], rel=1e-3
        )
        assert "layer_speedup" not in limit and point["reference"] != point["limit"]  # never the reference
    assert list((tmp_path / "cache" / "single-graph").glob(f"*-{layers}layers/full_model.onnx"))
    table = CliRunner().invoke(bench_cli, arguments)
    assert table.exit_code == 0, table.output
    assert table.output.startswith(f"CPU: {describe_cpu(cpu_description())}")
    assert "x limit" in table.output


@pytest.mark.parametrize(("speedup", "layers"), [(0.0, 6), (0.5, 3), (0.52, 3), (0.59, 2), (0.99, 1)])
def test_the_truncation_runs_the_layers_a_point_runs_on_average(speedup, layers):
    assert truncated_layers(6, speedup) == layers


def test_the_cpu_line_names_the_flags_that_matter(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f amx_int8\n")
    cpu = cpu_description(cpuinfo)
    assert cpu == {"model": "Some CPU", "flags": ["avx2", "avx512f", "amx_int8"], "flags_known": True}
    assert describe_cpu(cpu) == "Some CPU (avx2 avx512f amx_int8)"
    assert describe_cpu(cpu_description(tmp_path / "missing"))  # no /proc/cpuinfo: still a line


def test_the_cpu_clock_needs_one_thread(calibrated):
    model_dir, bundle, data = calibrated
    result = CliRunner().invoke(bench_cli, [str(bundle), *data_arguments(data), "--clock", "cpu"])
    assert result.exit_code != 0 and "--intra-op-threads 1" in result.output
    assert "Traceback" not in result.output
