"""Hardening of pcee-calibrate / pcee-eval: concurrent writers, corrupt caches, write failures,
debris, per-point reports, the target rule, exact frontiers, plots, one point serialization,
held-out evaluation. Each test pins one defect of the hardening issue."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from test_calibration import calibrate_cli, synthetic_rows

from pcee.calibration.calibrate import Objective, calibrate, split_rows
from pcee.calibration.cli import data_options, eval_main
from pcee.calibration.collect import record_all_exits
from pcee.calibration.report import format_table
from pcee.calibration.search import TARGET_BAND, Sweep, all_states, pareto_frontier, search_target, sweeps_for
from pcee.calibration.simulate import CalibrationRows, Simulator
from pcee.runtime import AllExits, EarlyExitRuntime, Manifest, OperatingPoint, record_operating_point

DATA_COLUMNS = ("--text-column", "text", "--label-column", "label")


def calibrate_args(bundle: Path, data: Path, *more: str) -> list:
    return [bundle, "--data", data, *DATA_COLUMNS, "--target-speedup", "0.3", *more]


def exhaustive(simulator: Simulator, sweeps: list[Sweep]):
    """Every point of every sweep, replayed: the ground truth the exact sweep states must match."""
    return [simulator.run(sweep.point(index)) for sweep in sweeps for index in range(len(sweep))]


# ------------------------------------------------------------------ 1. concurrent calibrations


def record_with_a_slow_save(bundle: Path, name: str, barrier) -> None:
    """A child process: its manifest write is slow, so every writer reads before any writes."""
    save = Manifest.save

    def slow_save(manifest, bundle_dir):
        time.sleep(0.3)
        save(manifest, bundle_dir)

    Manifest.save = slow_save
    barrier.wait()
    record_operating_point(bundle, OperatingPoint("pcee", tau=0.5, patience=1, name=name), {"name": name})


def test_concurrent_calibrations_keep_every_point(bundle: Path):
    names = ["a", "b", "c", "d"]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(names))
    writers = [
        context.Process(target=record_with_a_slow_save, args=(bundle, name, barrier)) for name in names
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [writer.exitcode for writer in writers] == [0] * len(names)
    saved = {point.name for point in Manifest.load(bundle).operating_points}
    assert set(names) <= saved, f"lost points: {set(names) - saved}"


# ------------------------------------------------------------------ 2. corrupt calibration cache


def corrupt(cache_file: Path, how: str, rows: int, layers: int, labels: int) -> None:
    def exits(rows=rows, layers=layers, labels=labels, entropy_rows=rows, **extra):
        return {
            "logits": np.zeros((rows, layers, labels), np.float32),
            "entropy": np.zeros((entropy_rows, layers), np.float32),
            "max_probability": np.zeros((rows, layers), np.float32),
            **extra,
        }

    if how == "empty":
        cache_file.write_bytes(b"")
    elif how == "garbage":
        cache_file.write_bytes(os.urandom(300))
    else:
        arrays = {
            "wrong rows": exits(rows=rows + 1, entropy_rows=rows + 1),
            "wrong layers": exits(layers=layers + 1),
            "wrong labels": exits(labels=labels + 1),
            "inconsistent arrays": exits(entropy_rows=rows - 1),
            "missing array": {"logits": np.zeros((rows, layers, labels), np.float32)},
            "a learned score the bundle lacks": exits(confidence_score=np.zeros((rows, layers), np.float32)),
        }[how]
        with cache_file.open("wb") as handle:
            np.savez(handle, **arrays)


@pytest.mark.parametrize(
    "how",
    [
        "empty",
        "garbage",
        "wrong rows",
        "wrong layers",
        "wrong labels",
        "inconsistent arrays",
        "missing array",
        "a learned score the bundle lacks",
    ],
)
def test_a_corrupt_cache_is_discarded_with_a_warning_and_recorded_again(how: str, bundle: Path):
    runtime = EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu")
    batch = runtime.tokenizer.encode_texts(["a good film", "dull", "the plot is fun", "bad actors"])
    first = record_all_exits(runtime, batch, progress=False)
    corrupt(first.cache_file, how, len(batch), runtime.num_layers, len(runtime.labels))
    with pytest.warns(UserWarning, match=f"{first.cache_file.name}.*recording the exits again"):
        again = record_all_exits(runtime, batch, progress=False)
    assert not again.from_cache
    np.testing.assert_array_equal(again.exits.logits, first.exits.logits)
    assert record_all_exits(runtime, batch, progress=False).from_cache


def test_the_cli_survives_an_empty_cache_file(bundle: Path, data_csv: Path):
    assert calibrate_cli(*calibrate_args(bundle, data_csv, "--dry-run")).exit_code == 0
    (cache_file,) = (bundle / ".pcee-cache").iterdir()
    cache_file.write_bytes(b"")
    with pytest.warns(UserWarning, match=f"discarding the cached recording .*{cache_file.name}"):
        result = calibrate_cli(*calibrate_args(bundle, data_csv, "--dry-run"))
    assert result.exit_code == 0, result.output
    assert "Aborted" not in result.output and "from the new recording" in result.output


# ------------------------------------------------------------------ 3. write failures, 12. typed errors


def failing_writes(monkeypatch, target_name: str | None, code: int) -> None:
    """Every atomic write (or only the one to `target_name`) fails with `code`, as on a read-only or full disk."""
    real_replace = os.replace

    def replace(source, target):
        if target_name is None or Path(target).name == target_name:
            Path(source).unlink(missing_ok=True)
            raise OSError(code, os.strerror(code), str(target))
        real_replace(source, target)

    monkeypatch.setattr("pcee.runtime.atomic.os.replace", replace)


@pytest.mark.filterwarnings(
    "ignore:could not cache the recorded exits"
)  # the cache write fails too, as it should
@pytest.mark.parametrize(
    "case, target_name, code",
    [
        ("read-only manifest", "manifest.json", errno.EROFS),
        ("read-only bundle", None, errno.EROFS),
        ("full disk", None, errno.ENOSPC),
    ],
)
def test_a_failed_write_is_one_clear_line(
    case: str, target_name, code: int, bundle: Path, data_csv: Path, monkeypatch
):
    failing_writes(monkeypatch, target_name, code)
    result = calibrate_cli(*calibrate_args(bundle, data_csv))
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a raw OSError
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1 and os.strerror(code) in error_lines[0], result.output
    assert str(bundle / (target_name or "")) in error_lines[0]


def test_a_metric_error_is_one_clear_line(bundle: Path, data_csv: Path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["metric"] = "bleu"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    for command in (
        calibrate_cli(*calibrate_args(bundle, data_csv)),
        CliRunner().invoke(eval_main, [str(bundle), "--data", str(data_csv), *DATA_COLUMNS]),
    ):
        assert command.exit_code == 1 and isinstance(command.exception, SystemExit), command.output
        assert command.output.startswith("Error: unknown metric 'bleu'") and "Traceback" not in command.output


# ------------------------------------------------------------------ 4. debris after a kill


def test_stale_report_temp_files_are_removed_and_nothing_else(bundle: Path, data_csv: Path):
    report_dir = bundle / "reports" / "speedup-0.30"
    report_dir.mkdir(parents=True)
    stale = [
        report_dir / ".calibration-frontier.png.k2j4_x9a",
        report_dir / ".calibration-report.json.abcd1234",
    ]
    kept = [
        report_dir / ".calibration-patience.png.fresh123",  # younger than this process: maybe another run's
        report_dir / ".notes.txt.abcd1234",
        report_dir / "calibration-frontier.png.abcd1234",
        bundle / ".manifest.json.abcd1234",
    ]
    an_hour_ago, in_a_minute = time.time() - 3600, time.time() + 60
    for path in stale + kept:
        path.write_bytes(b"partial")
        os.utime(path, (an_hour_ago, an_hour_ago))
    os.utime(kept[0], (in_a_minute, in_a_minute))
    result = calibrate_cli(*calibrate_args(bundle, data_csv))
    assert result.exit_code == 0, result.output
    assert [path for path in stale if path.exists()] == []
    assert all(path.exists() for path in kept)


# ------------------------------------------------------------------ 5. one report per point name


def test_each_point_name_keeps_its_own_report(bundle: Path, data_csv: Path):
    for name in ("fast", "quality"):
        result = calibrate_cli(*calibrate_args(bundle, data_csv, "--name", name))
        assert result.exit_code == 0, result.output
    for name in ("fast", "quality"):
        report = json.loads((bundle / "reports" / name / "calibration-report.json").read_text())
        assert report["operating_point"]["name"] == name
        assert (bundle / "reports" / name / "calibration-frontier.csv").is_file()
    assert not (bundle / "calibration-report.json").exists()


def test_point_names_must_be_usable_as_folder_names(bundle: Path, data_csv: Path):
    result = calibrate_cli(*calibrate_args(bundle, data_csv, "--name", "../escape"))
    assert result.exit_code == 2 and "--name" in result.output


# ------------------------------------------------------------------ 6. plots without matplotlib


def test_missing_matplotlib_is_said_in_one_line(bundle: Path, data_csv: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = calibrate_cli(*calibrate_args(bundle, data_csv))
    assert result.exit_code == 0, result.output
    assert "plots skipped: matplotlib is not installed; pip install 'pcee[export]'" in result.output
    assert not list((bundle / "reports").rglob("*.png"))


# ------------------------------------------------------------------ 7. the best point over every patience


def test_target_search_takes_the_best_point_of_the_band_over_every_patience():
    simulator = Simulator(synthetic_rows(seed=26, count=240, num_layers=4), "accuracy")
    sweeps = sweeps_for("pcee", simulator.rows.exits)
    target = 0.3
    chosen = search_target(simulator, sweeps, target)
    every_point = [[simulator.run(sweep.point(index)) for index in range(len(sweep))] for sweep in sweeps]
    in_band = [
        [outcome for outcome in outcomes if target <= outcome.layer_speedup <= target + TARGET_BAND]
        for outcomes in every_point
    ]
    assert sum(1 for outcomes in in_band if outcomes) >= 2, "several patiences should compete in the band"
    assert target <= chosen.layer_speedup <= target + TARGET_BAND
    assert chosen.metric == max(outcome.metric for outcomes in in_band for outcome in outcomes)


def test_target_search_ties_go_to_the_faster_point_of_the_band_then_the_lower_patience():
    """Every layer predicts alike, so every point has the same metric: the fastest in the band, at the lowest patience, wins."""
    rows = synthetic_rows(seed=22, count=100, num_layers=4)
    exits = rows.exits
    same_logits = np.repeat(exits.logits[:, -1:], 4, axis=1)
    simulator = Simulator(
        CalibrationRows(AllExits(same_logits, exits.entropy, exits.max_probability), rows.labels), "accuracy"
    )
    sweeps = sweeps_for("pcee", simulator.rows.exits)
    chosen = search_target(simulator, sweeps, 0.2)
    in_band = [
        state for state in all_states(simulator, sweeps) if 0.2 <= state.layer_speedup <= 0.2 + TARGET_BAND
    ]
    fastest = max(state.layer_speedup for state in in_band)
    assert chosen.layer_speedup == fastest
    assert chosen.point.patience == min(state.patience for state in in_band if state.layer_speedup == fastest)


# ------------------------------------------------------------------ 8. exact frontiers


@pytest.mark.parametrize(
    "policy, patience", [("pcee", 2), ("pcee-maxprob", 3), ("branchynet", 1), ("pcee-learned", 2)]
)
def test_exact_sweep_states_match_a_replay_at_every_threshold(policy: str, patience: int):
    from pcee.calibration.search import sweep_states

    rows = synthetic_rows(seed=23, count=60, num_layers=4, num_labels=3)
    exits = rows.exits
    scored = CalibrationRows(
        AllExits(exits.logits, exits.entropy, exits.max_probability, 1.0 - exits.entropy), rows.labels
    )
    simulator = Simulator(scored, "accuracy", has_learned_score=True)
    (sweep,) = [sweep for sweep in sweeps_for(policy, scored.exits) if sweep.patience == patience]
    states = sweep_states(simulator, sweep)
    starts = [state.index for state in states]
    assert starts == sorted(starts) and starts[0] == 0
    for index in range(len(sweep)):
        state = states[np.searchsorted(starts, index, side="right") - 1]
        replayed = simulator.run(sweep.point(index))
        assert (state.layer_speedup, state.metric) == (replayed.layer_speedup, replayed.metric), index


def test_frontiers_and_the_table_read_every_baseline_exactly():
    rows = synthetic_rows(seed=24, count=400, num_layers=4)
    result = calibrate(rows, "accuracy", Objective(target_speedup=0.5), holdout_fraction=0.25, seed=0)
    search_rows, _ = split_rows(len(rows), 0.25, 0, ("search", "held-out"))
    search = Simulator(rows.subset(search_rows), "accuracy")
    table = {line.split()[0]: line for line in format_table(result).splitlines() if line.strip()}
    for policy in ("branchynet", "shallow-deep", "pcee"):
        truth = pareto_frontier(exhaustive(search, sweeps_for(policy, search.rows.exits)))
        reported = result.frontiers[policy]
        assert [(o.layer_speedup, o.metric) for o in reported] == [
            (o.layer_speedup, o.metric) for o in truth
        ], policy
        best = max(
            (o for o in truth if o.layer_speedup >= result.chosen.layer_speedup),
            key=lambda o: (o.metric, o.layer_speedup),
        )
        assert table[policy].endswith(f"{best.layer_speedup:>16.4f}{best.metric:>12.4f}"), table[policy]


# ------------------------------------------------------------------ 9. plots


def test_the_pcee_curve_is_drawn_on_top_and_identical_frontiers_are_one_labelled_line():
    pytest.importorskip("matplotlib")
    from pcee.calibration.report import draw_frontiers

    result = calibrate(
        synthetic_rows(seed=3, count=300, num_labels=2), "accuracy", Objective(target_speedup=0.4)
    )
    lines = {line.get_label(): line for line in draw_frontiers(result).axes[0].get_lines()}
    assert {"pcee (= pcee-maxprob)", "branchynet (= shallow-deep)", "pabee", "budgeted"} <= set(lines)
    frontiers = [line for label, line in lines.items() if label not in ("chosen", "full model")]
    drawn = [tuple(map(tuple, line.get_xydata())) for line in frontiers]
    assert len(drawn) == len(set(drawn)), "an identical frontier is drawn twice, hidden under the other"
    named = [name for label in lines for name in re.findall(r"[\w-]+", label)]
    assert sorted(part for part in named if part in result.frontiers) == sorted(result.frontiers)
    pcee = lines["pcee (= pcee-maxprob)"]
    others = [line for line in frontiers if line is not pcee]
    assert all(
        pcee.get_zorder() > line.get_zorder() and pcee.get_linewidth() > line.get_linewidth()
        for line in others
    )


def test_three_class_frontiers_are_not_called_identical():
    pytest.importorskip("matplotlib")
    from pcee.calibration.report import draw_frontiers

    result = calibrate(
        synthetic_rows(seed=26, count=300, num_labels=3), "accuracy", Objective(target_speedup=0.4)
    )
    labels = [line.get_label() for line in draw_frontiers(result).axes[0].get_lines()]
    assert "pcee-maxprob" in labels and not any("(=" in label for label in labels)


# ------------------------------------------------------------------ 10. one serialization of a point


def test_reports_serialize_points_with_operating_point_to_dict(bundle: Path, data_csv: Path):
    result = calibrate_cli(*calibrate_args(bundle, data_csv, "--json"))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    every_field = {field.name for field in fields(OperatingPoint)}
    point = document["operating_point"]
    assert (
        set(point) == every_field
        and point == OperatingPoint.from_dict(point).to_dict()
        and point["source"] == "pcee-calibrate"
    )
    report = json.loads((bundle / "reports" / "speedup-0.30" / "calibration-report.json").read_text())
    assert all(every_field <= set(row) for row in report["frontiers"])
    assert Manifest.load(bundle).calibration["operating_point"] == point


# ------------------------------------------------------------------ 11. evaluation on the held-out rows


def test_eval_holdout_of_a_point_runs_the_rows_its_calibration_held_out(
    bundle: Path, data_csv: Path, tmp_path: Path
):
    calibrated = calibrate_cli(
        *calibrate_args(bundle, data_csv, "--name", "fast", "--holdout-fraction", "0.25", "--seed", "3")
    )
    assert calibrated.exit_code == 0, calibrated.output
    report = json.loads((bundle / "reports" / "fast" / "calibration-report.json").read_text())
    result = CliRunner().invoke(
        eval_main, [str(bundle), "--data", str(data_csv), *DATA_COLUMNS, "--holdout-of", "fast", "--json"]
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)
    assert evaluation["rows"] == report["holdout"]["rows"] == 30
    assert evaluation["operating_point"] == report["operating_point"]
    # Served early exit on the held-out rows gives the simulated held-out numbers of the report.
    assert evaluation["exit_histogram"] == report["holdout"]["exit_histogram"]
    assert (
        evaluation["metric"] == report["holdout"]["metric"]
        and evaluation["layer_speedup"] == report["holdout"]["layer_speedup"]
    )

    other_data = data_csv.with_name("other.csv")
    other_data.write_text("\n".join(data_csv.read_text().splitlines()[:-1]) + "\n")
    mismatch = CliRunner().invoke(
        eval_main, [str(bundle), "--data", str(other_data), *DATA_COLUMNS, "--holdout-of", "fast"]
    )
    assert mismatch.exit_code == 1 and "not the data point 'fast' was calibrated on" in mismatch.output, (
        mismatch.output
    )
    missing = CliRunner().invoke(
        eval_main, [str(bundle), "--data", str(data_csv), *DATA_COLUMNS, "--holdout-of", "slow"]
    )
    assert missing.exit_code == 1 and "no calibration report for point 'slow'" in missing.output, (
        missing.output
    )


# ------------------------------------------------------------------ options


def test_data_options_are_only_data_options():
    command = data_options(click.command()(lambda **options: None))
    assert {param.name for param in command.params} == {
        "data",
        "task",
        "text_column",
        "text_pair_column",
        "label_column",
    }
