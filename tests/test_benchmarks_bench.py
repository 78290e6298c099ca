"""pcee-bench: thread settings, the single-graph cache outside the bundle, options, docs paths, one-line errors.

Runs on a tiny random model exported once per module (with and without the single graph inside),
over a dozen rows, one repeat.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

torch = pytest.importorskip("torch")

from bundles import SENTENCES  # noqa: E402

from pcee.benchmarks import bench  # noqa: E402
from pcee.benchmarks.cli import main as bench_cli  # noqa: E402
from pcee.benchmarks.glue_study import TASKS, Study  # noqa: E402
from pcee.benchmarks.glue_study import main as study_cli  # noqa: E402
from pcee.modeling.model import MultiExitClassifier  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
QUICK = ["--repeats", "1", "--batch-sizes", "1,4", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(sst2_model_dir: Path) -> Path:
    return sst2_model_dir


@pytest.fixture(scope="module")
def bundle_with_single_graph(sst2_single_graph_bundle: Path, tmp_path_factory) -> Path:
    """A copy for this module: pcee-bench caches its exit recording in the bundle."""
    target = tmp_path_factory.mktemp("bench") / "with-single-graph-pcee"
    return Path(shutil.copytree(sst2_single_graph_bundle, target))


@pytest.fixture
def bundle(sst2_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the bundle pcee-export writes by default: pcee-bench caches its exit recording in it."""
    return Path(shutil.copytree(sst2_bundle, tmp_path / "bundle-pcee"))


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text(
        "text,label\n"
        + "".join(f"{text.replace(',', '')},{index % 2}\n" for index, text in enumerate(SENTENCES))
    )
    return path


def run_bench(bundle_dir: Path, data: Path, *arguments) -> Result:
    data_arguments = ["--data", data, "--text-column", "text", "--label-column", "label"]
    return CliRunner().invoke(
        bench_cli, [str(argument) for argument in (bundle_dir, *data_arguments, *QUICK, *arguments)]
    )


def single_error_line(result) -> str:
    """The one `Error:` line a failed command printed; fails on a traceback or a success."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    )
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ 1. threads


def test_pytorch_runs_on_the_requested_threads_and_gets_its_own_back(
    bundle_with_single_graph, model_dir, data_csv, monkeypatch, tmp_path
):
    threads_seen = []
    forward = MultiExitClassifier.forward

    def counting_forward(self, *arguments, **keywords):
        threads_seen.append(torch.get_num_threads())
        return forward(self, *arguments, **keywords)

    monkeypatch.setattr(MultiExitClassifier, "forward", counting_forward)
    before = torch.get_num_threads()
    requested = before + 1  # differs from torch's default whatever the machine
    result = run_bench(
        bundle_with_single_graph,
        data_csv,
        "--model-dir",
        model_dir,
        "--intra-op-threads",
        requested,
        "--cache-dir",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert threads_seen and set(threads_seen) == {requested}
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------ 2. --model-dir when the bundle has no single graph


def test_help_says_when_model_dir_is_required():
    help_text = flat(CliRunner().invoke(bench_cli, ["--help"]).output)
    assert "REQUIRED when the bundle has no single-graph model" in help_text


def test_missing_model_dir_fails_in_one_line_before_running_the_model(bundle, data_csv, tmp_path):
    line = single_error_line(run_bench(bundle, data_csv, "--cache-dir", tmp_path))
    assert "--model-dir" in line and "--with-full-graph" in line
    assert not (bundle / ".pcee-cache").exists()  # failed before recording the exits


# ------------------------------------------------------------------ 3. the single-graph cache


def test_single_graph_is_cached_outside_the_bundle_and_reused(bundle, model_dir, data_csv, tmp_path):
    cache = tmp_path / "cache"
    first = run_bench(bundle, data_csv, "--model-dir", model_dir, "--cache-dir", cache, "--json")
    assert first.exit_code == 0, first.output
    cached = json.loads(first.stdout)["single_graph"]
    assert cached["origin"] == "exported" and Path(cached["file"]).is_relative_to(cache)
    assert cached["file"] in first.stderr  # says where it went
    assert not list(bundle.rglob("*full_model*"))
    second = run_bench(bundle, data_csv, "--model-dir", model_dir, "--cache-dir", cache, "--json")
    assert json.loads(second.stdout)["single_graph"] == {**cached, "origin": "cache"}


def test_the_bundles_own_single_graph_needs_no_model_dir(bundle_with_single_graph, data_csv, tmp_path):
    result = run_bench(bundle_with_single_graph, data_csv, "--cache-dir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["single_graph"]["origin"] == "bundle"
    assert not list(tmp_path.iterdir())


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bench.default_cache_dir() == tmp_path / "pcee"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert bench.default_cache_dir() == Path.home() / ".cache" / "pcee"


def test_a_failed_export_leaves_nothing_in_the_cache(model_dir, monkeypatch, tmp_path):
    def broken_export(model, path, **options):
        Path(path).write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr("pcee.exporter.graph_export.export_full_graph", broken_export)
    with pytest.raises(KeyboardInterrupt):
        bench.cached_single_graph(model_dir, tmp_path)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


# ------------------------------------------------------------------ 4. options


def test_one_batch_size_option_and_every_option_explains_itself(bundle_with_single_graph, data_csv):
    options = {name: param for param in bench_cli.params for name in param.opts}
    assert "--batch-sizes" in options and "--json" in options
    assert "--batch-size" not in options and "--backend" not in options  # pcee-bench measures the CPU chain
    assert [
        name for name, param in options.items() if isinstance(param, click.Option) and not param.help
    ] == []
    result = run_bench(bundle_with_single_graph, data_csv, "--json")
    assert sorted(json.loads(result.stdout)["results"]) == ["1", "4"]


def test_points_measure_every_chain_at_each_saved_point(bundle_with_single_graph, data_csv, tmp_path):
    from pcee.calibration.cli import calibrate_main

    bundle = Path(shutil.copytree(bundle_with_single_graph, tmp_path / "calibrated-pcee"))
    data = ["--data", str(data_csv), "--text-column", "text", "--label-column", "label", "--no-progress"]
    for name, target in (("half", "0.3"), ("most", "0.6")):
        calibrated = CliRunner().invoke(
            calibrate_main, [str(bundle), *data, "--target-speedup", target, "--name", name]
        )
        assert calibrated.exit_code == 0, calibrated.output
    plot = tmp_path / "rows-per-second.png"
    report = json.loads(run_bench(bundle, data_csv, "--points", "half,most", "--plot", plot, "--json").stdout)
    assert plot.read_bytes().startswith(b"\x89PNG")
    figures = report["results"]["1"]
    for name in ("half", "most"):
        entry = figures[f"runtime_point_{name}"]
        assert entry["throughput_vs_single_graph"] == pytest.approx(1 / (1 - entry["wall_speedup"]), rel=1e-3)
    assert set(report["chains"]["first"]["operating_points"]) == {"runtime_point_half", "runtime_point_most"}
    assert "runtime_operating_point" not in figures and "chain_overhead" in figures
    assert "no saved operating point nowhere" in single_error_line(
        run_bench(bundle, data_csv, "--points", "half,nowhere")
    )


# ------------------------------------------------------------------ 5. docs name no machine's paths


@pytest.mark.parametrize(
    "document",
    [
        "docs/RESULTS.md",
        "benchmarks/cli.py",
        "benchmarks/glue_study.py",
        "benchmarks/profile_batch1.py",
        "benchmarks/optimum_compare.py",
    ],
)
def test_docs_use_paths_relative_to_the_project(document):
    text = (REPOSITORY / document).read_text()
    assert re.findall(r"/work/\S*|\.\./shared\S*", text) == []


def test_the_glue_study_names_bundles_as_pcee_export_does(tmp_path):
    study = Study(tmp_path / "glue", tmp_path / "study", list(TASKS.values()), seed=0)
    for task in study.tasks:
        model_dir = study.model_dir(task)
        assert study.bundle_dir(task) == model_dir.with_name(model_dir.name + "-pcee")


def test_the_glue_study_exports_a_task_and_reports_its_parity(sst2_model_dir, tmp_path):
    study = Study(tmp_path / "glue", tmp_path / "study", [TASKS["sst2"]], seed=0)
    shutil.copytree(sst2_model_dir, study.model_dir(TASKS["sst2"]))
    arguments = [
        "--glue-dir",
        str(tmp_path / "glue"),
        "--workdir",
        str(tmp_path / "study"),
        "--tasks",
        "sst2",
    ]
    result = CliRunner().invoke(study_cli, [*arguments, "export"])
    assert result.exit_code == 0, result.output
    assert "parity passed: True" in result.output


# ------------------------------------------------------------------ 6. one-line errors


@pytest.mark.parametrize(
    "arguments, says",
    [
        (["--model-dir", "{bundle}"], "config.json"),  # a bundle is not a model directory
        (["--batch-sizes", "0,1"], "--batch-sizes"),
        (["--plot", "{bundle}/no-such-dir/chart.png"], "--plot"),
        (["--plot", "{bundle}/chart.svg"], "--plot"),
        (["--model-dir", "{model_dir}", "--cache-dir", "{bundle}/manifest.json"], "--cache-dir"),
        (["--model-dir", "{model_dir}", "--cache-dir", "{bundle}/manifest.json/below"], "writable"),
    ],
)
def test_bad_input_gets_one_line_and_no_traceback(bundle, model_dir, data_csv, arguments, says):
    filled = [argument.format(bundle=bundle, model_dir=model_dir) for argument in arguments]
    assert says in single_error_line(run_bench(bundle, data_csv, *filled))


def test_plot_without_matplotlib_fails_before_any_timing(bundle, data_csv, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args),
    )
    import pcee.benchmarks.cli as cli_module

    monkeypatch.setattr(
        cli_module, "measure", lambda *args, **kwargs: pytest.fail("timed before checking --plot")
    )
    assert "--plot needs matplotlib" in single_error_line(
        run_bench(bundle, data_csv, "--plot", tmp_path / "chart.png")
    )


def test_a_missing_bundle_gets_one_line(data_csv, tmp_path):
    assert "nowhere does not exist; pass a bundle directory" in single_error_line(
        run_bench(tmp_path / "nowhere", data_csv)
    )


# ------------------------------------------------------------------ 7. the batch-1 profile


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"]])
def test_the_batch1_profile_takes_every_step_against_the_single_graph(
    bundle_with_single_graph, tmp_path, extra
):
    from pcee.benchmarks.profile_batch1 import main as profile_cli

    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{text}\t1\n" for text in SENTENCES))
    result = CliRunner().invoke(
        profile_cli,
        [
            str(bundle_with_single_graph),
            "--data",
            str(data),
            "--rows",
            "5",
            "--repeats",
            "1",
            "--json",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    steps = [
        "single_graph",
        "sessions_no_exit_heads",
        "sessions",
        "backend",
        "runtime_all_layers",
        "runtime_operating_point",
        "compiled_all_layers",
        "compiled_operating_point",
        "sessions_onnxruntime_defaults",
        "truncated_bundle_graphs",
        "row_depths_ideal",
        "row_depths_exit_work",
        "compiled_graph_by_depth",
        "compiled_graph_call",
    ]
    assert (
        list(report["ms_per_row"]) == steps
        and report["rows"] == 5
        and report["versus_single_graph"]["single_graph"] == 1
    )
    assert all(value > 0 for value in report["ms_per_row"].values())
    assert sum(report["exit_layers"]) == 5 and 1 <= report["limit_layers"] <= len(report["exit_layers"])
    assert 1 <= report["mean_exit_layer"] <= len(report["exit_layers"])
    assert 1 <= report["token_weighted_exit_layer"] <= len(report["exit_layers"])
    assert report["limit_ratio"]["truncated_bundle_graphs"] == 1 and len(report["limit_ratio"]) == 6


def test_the_batch1_profile_composes_the_bundle_graphs_when_it_has_no_single_graph(bundle, tmp_path):
    from pcee.benchmarks.profile_batch1 import main as profile_cli

    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{text}\t1\n" for text in SENTENCES))
    options = [str(bundle), "--data", str(data), "--rows", "3", "--repeats", "1", "--point", "default"]
    result = CliRunner().invoke(profile_cli, [*options, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (
        report["single_graph"] == "bundle_graphs_composed.onnx"
        and report["operating_point"]["name"] == "default"
    )
    assert "the point against the model cut to" in CliRunner().invoke(profile_cli, options).output
    assert "--single-graph" in single_error_line(
        CliRunner().invoke(profile_cli, [*options, "--quantize", "int8"])
    )


def test_the_token_weighted_exit_layer_weighs_each_row_by_its_tokens():
    from types import SimpleNamespace

    import numpy as np

    from pcee.benchmarks.profile_batch1 import token_weighted_mean

    rows = [
        SimpleNamespace(attention_mask=np.array([[1, 1, 0, 0]])),
        SimpleNamespace(attention_mask=np.ones((1, 6))),
    ]
    assert token_weighted_mean([1, 3], rows) == 2.5  # (1 x 2 + 3 x 6) / 8; unweighted it would be 2
