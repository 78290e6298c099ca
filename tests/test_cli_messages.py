"""Error messages that name the fix, for the mistakes of a first hour with pcee."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcee.calibration.cli import calibrate_main
from pcee.runtime import BundleError, EarlyExitRuntime
from pcee.runtime.cli import main as predict_main

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--data", str(ROOT / "demo" / "data"), "--task", "sst2"]


@pytest.fixture
def model_and_bundle(sst2_model_dir, sst2_bundle) -> tuple[Path, Path]:
    """A model directory with its bundle next to it, where pcee-export puts it: MODEL_DIR-pcee (read-only)."""
    assert sst2_bundle == sst2_model_dir.with_name(f"{sst2_model_dir.name}-pcee")
    return sst2_model_dir, sst2_bundle


def calibrate(*arguments: str):
    return CliRunner().invoke(calibrate_main, [*arguments, *DATA])


def test_calibrating_a_missing_directory_says_it_does_not_exist(tmp_path):
    result = calibrate(str(tmp_path / "runs" / "nowhere"), "--target-speedup", "0.5")
    assert result.exit_code == 1
    assert "does not exist" in result.output and "pcee-export MODEL_DIR" in result.output


@pytest.mark.parametrize(("given", "fraction"), [("50", "0.5"), ("75", "0.75"), ("12.5", "0.125")])
def test_a_percentage_target_gets_the_fraction_to_pass(bundle, given, fraction):
    result = calibrate(str(bundle), "--target-speedup", given)
    assert result.exit_code != 0 and f"not a percentage; pass {fraction}" in result.output


def test_a_model_directory_points_at_its_bundle(model_and_bundle):
    model_dir, bundle = model_and_bundle
    with pytest.raises(BundleError, match=f"model directory, not a bundle; its exported bundle is {bundle}"):
        EarlyExitRuntime.from_bundle(model_dir)
    result = CliRunner().invoke(predict_main, [str(model_dir), "--text", "a dull story"])
    assert result.exit_code == 1 and "pass that" in result.output and str(bundle) in result.output
    result = calibrate(str(model_dir), "--target-speedup", "0.5")
    assert result.exit_code == 1 and str(bundle) in result.output


def test_a_model_directory_without_a_bundle_says_to_export_it(model_and_bundle, tmp_path):
    model_dir = tmp_path / "sst2"
    shutil.copytree(model_and_bundle[0], model_dir)
    with pytest.raises(BundleError, match=f"export it first: pcee-export {model_dir}"):
        EarlyExitRuntime.from_bundle(model_dir)


def test_eval_prints_layers_saved_and_the_wall_clock_multiple_each_labelled():
    from pcee.calibration.cli import evaluation_text

    evaluation = {
        "metric_name": "accuracy",
        "metric": 0.8,
        "exit_histogram": [3, 1],
        "operating_point": {"policy": "pcee", "tau": 0.2, "patience": 1},
        "rows": 4,
        "backend": "onnxruntime",
        "layer_speedup": 0.375,
        "wall_speedup": 0.5,
        "wall_time_s": 0.5,
        "full_model": {"metric": 0.9, "wall_time_s": 1.0},
    }
    speed = evaluation_text(evaluation).splitlines()[1]
    assert (
        "layers saved 37.5% (layer speed-up 0.3750)" in speed
        and "wall clock 2.00x the full model's speed" in speed
    )


def test_the_bench_progress_bar_counts_labelled_passes(monkeypatch):
    from pcee.benchmarks import cli

    bar_options = {}

    class Bar:
        def __init__(self, **options):
            bar_options.update(options)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            return False

    monkeypatch.setattr(cli, "tqdm", Bar)
    monkeypatch.setattr(cli, "chunks_of", lambda batch, size: [])
    monkeypatch.setattr(cli, "measure", lambda *arguments: {})
    monkeypatch.setattr(cli, "summarize", lambda *arguments, **options: {})
    cli.measure_batch_size([], [], 1, 6, {"repeats": 3, "no_progress": False, "clock": "wall"})
    assert bar_options["unit"] == "pass"
