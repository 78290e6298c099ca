"""pcee.calibration: exact simulation, target search, the quality bound, manifest updates, CLI errors.

The pure-numpy parts run on synthetic N x M x K exits; the rest on a tiny random model exported
once per module (its exits are near-uniform, so thresholds come from the observed quantiles).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from bundles import WORDS, write_labelled_csv
from click.testing import CliRunner

from pcee.calibration.bound import FULL_MODEL, binomial_cdf, certify_max_drop, drop_losses
from pcee.calibration.bundle import bundle_label_indices
from pcee.calibration.calibrate import Objective, calibrate, split_rows
from pcee.calibration.cli import calibrate_main, eval_main
from pcee.calibration.collect import record_all_exits
from pcee.calibration.errors import CalibrationError
from pcee.calibration.search import search_target, sweeps_for
from pcee.calibration.simulate import CalibrationRows, Simulator, simulate
from pcee.modeling.data import TextDataset
from pcee.runtime import (
    MANIFEST_NAME,
    AllExits,
    EarlyExitRuntime,
    Manifest,
    OperatingPoint,
    build_policy,
    merged_points,
    record_operating_point,
    softmax,
)


def synthetic_rows(seed: int, count: int, num_layers: int = 4, num_labels: int = 2) -> CalibrationRows:
    """Exits that grow more accurate and more confident with depth; rows differ in difficulty."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(num_labels, size=count)
    strength = np.linspace(0.5, 3.0, num_layers)[None, :, None] * rng.uniform(0.0, 1.5, size=(count, 1, 1))
    noise = 0.8 * rng.normal(size=(count, 1, num_labels)) + 0.6 * rng.normal(
        size=(count, num_layers, num_labels)
    )
    logits = (strength * np.eye(num_labels)[labels][:, None, :] + noise).astype(np.float32)
    probabilities = softmax(logits)
    entropy = -(probabilities * np.log(probabilities)).sum(axis=-1) / np.log(num_labels)
    return CalibrationRows(AllExits(logits, entropy.astype(np.float32), probabilities.max(axis=-1)), labels)


# ------------------------------------------------------------------ a tiny exported bundle


def calibrate_cli(*arguments: str):
    return CliRunner().invoke(calibrate_main, [*map(str, arguments), "--no-progress"])


# ------------------------------------------------------------------ simulation


def test_simulation_gives_the_runtime_exit_layers_and_predictions(bundle: Path):
    runtime = EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu")
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 20))) for _ in range(90)]
    batch = runtime.tokenizer.encode_texts(texts)
    exits = record_all_exits(runtime, batch, batch_size=16, progress=False).exits
    low, middle, high = np.quantile(exits.entropy, [0.25, 0.5, 0.75])
    confident_probability = float(np.quantile(exits.max_probability, 0.5))
    points = [
        OperatingPoint("pcee", tau=high, patience=1),
        OperatingPoint("pcee", tau=middle, patience=2),
        OperatingPoint("pcee", tau=high, patience=2, ensemble=True),
        OperatingPoint("pcee", tau=low, patience=1),
        OperatingPoint("pcee-maxprob", tau=confident_probability, patience=1),
        OperatingPoint("branchynet", tau=middle),
        OperatingPoint("pabee", patience=1),
        OperatingPoint("budgeted", layer=2),
        FULL_MODEL,
    ]
    for point in points:
        simulated = simulate(build_policy(point, runtime.num_layers), exits)
        served = runtime.predict_encoded(batch, point, batch_size=16)
        assert simulated.exit_layers.tolist() == [row.exit_layer for row in served.predictions], (
            point.describe()
        )
        np.testing.assert_allclose(
            simulated.probabilities, [row.probabilities for row in served.predictions], atol=1e-5
        )
    early = simulate(build_policy(points[0], runtime.num_layers), exits).exit_layers
    assert (early < runtime.num_layers).sum() > 10, "the thresholds should make rows exit early"


# ------------------------------------------------------------------ target speed-up


@pytest.mark.parametrize("policy", ["pcee", "pcee-maxprob"])
@pytest.mark.parametrize("target", [0.1, 0.33, 0.5, 0.62])
def test_target_search_reaches_the_target(policy: str, target: float):
    simulator = Simulator(synthetic_rows(seed=3, count=500), "accuracy")
    outcome = search_target(simulator, sweeps_for(policy, simulator.rows.exits), target)
    assert outcome.layer_speedup >= target
    assert outcome.point.policy == policy


def test_target_search_keeps_the_best_metric_over_patiences():
    simulator = Simulator(synthetic_rows(seed=4, count=400, num_layers=6), "accuracy")
    sweeps = sweeps_for("pcee", simulator.rows.exits)
    chosen = search_target(simulator, sweeps, 0.3)
    per_patience = [search_target(simulator, [sweep], 0.3) for sweep in sweeps if sweep.patience <= 4]
    assert chosen.metric == max(outcome.metric for outcome in per_patience)


def test_an_unreachable_target_names_the_reachable_range():
    simulator = Simulator(synthetic_rows(seed=5, count=200, num_layers=4), "accuracy")
    with pytest.raises(CalibrationError, match=r"out of reach.*0\.0000 to 0\.7500"):
        search_target(simulator, sweeps_for("pcee", simulator.rows.exits), 0.8)


def test_the_learned_score_is_searched_like_the_others():
    rows = synthetic_rows(seed=8, count=300)
    exits = rows.exits
    scored = AllExits(exits.logits, exits.entropy, exits.max_probability, 1.0 - exits.entropy)
    simulator = Simulator(CalibrationRows(scored, rows.labels), "accuracy", has_learned_score=True)
    outcome = search_target(simulator, sweeps_for("pcee-learned", scored), 0.4)
    assert outcome.layer_speedup >= 0.4 and outcome.point.policy == "pcee-learned"
    with pytest.raises(CalibrationError, match="needs a learned confidence score"):
        sweeps_for("pcee-learned", exits)


def test_pabee_and_budgeted_turn_their_only_knob():
    simulator = Simulator(synthetic_rows(seed=6, count=300, num_layers=4), "accuracy")
    pabee = search_target(simulator, sweeps_for("pabee", simulator.rows.exits), 0.2)
    budgeted = search_target(simulator, sweeps_for("budgeted", simulator.rows.exits), 0.5)
    assert pabee.point.tau is None and pabee.layer_speedup >= 0.2
    assert budgeted.point.layer == 2 and budgeted.layer_speedup == 0.5


def test_calibrate_reports_the_chosen_point_on_held_out_rows():
    rows = synthetic_rows(seed=7, count=500)
    result = calibrate(rows, "accuracy", Objective(target_speedup=0.4), holdout_fraction=0.2, seed=1)
    summary = result.to_dict()
    assert summary["calibration"]["rows"] == 400 and summary["holdout"]["rows"] == 100
    assert sum(summary["holdout"]["exit_histogram"]) == 100
    assert result.point.name == "speedup-0.40"
    assert set(result.frontiers) == {
        "pcee",
        "pcee-maxprob",
        "pabee",
        "branchynet",
        "shallow-deep",
        "budgeted",
    }
    for frontier in result.frontiers.values():
        speedups = [outcome.layer_speedup for outcome in frontier]
        metrics = [outcome.metric for outcome in frontier]
        assert speedups == sorted(speedups) and metrics == sorted(metrics, reverse=True)


# ------------------------------------------------------------------ quality bound


def test_binomial_cdf_matches_the_exact_sum():
    for trials, probability, successes in [(10, 0.3, 2), (50, 0.02, 0), (200, 0.05, 7), (30, 0.5, 30)]:
        exact = sum(
            math.comb(trials, k) * probability**k * (1 - probability) ** (trials - k)
            for k in range(successes + 1)
        )
        assert binomial_cdf(successes, trials, probability) == pytest.approx(exact, rel=1e-9)


def test_quality_bound_holds_its_guarantee_over_random_splits():
    """The true drop of the certified point exceeds D in at most epsilon of the trials; naive selection fails often."""
    population = synthetic_rows(seed=11, count=40_000)
    truth = Simulator(population, "accuracy")
    full = truth.run(FULL_MODEL)

    def true_risk(point: OperatingPoint) -> float:
        return float(drop_losses(truth.run(point).predictions, full.predictions, population.labels).mean())

    max_drop, confidence, trials = 0.02, 0.9, 60
    rng = np.random.default_rng(0)
    violations = naive_violations = 0
    for trial in range(trials):
        sample = population.subset(rng.choice(len(population), 800, replace=False))
        ordering_rows, testing_rows = split_rows(len(sample), 0.5, trial, ("ordering", "testing"))
        ordering, testing = (
            Simulator(sample.subset(ordering_rows), "accuracy"),
            Simulator(sample.subset(testing_rows), "accuracy"),
        )
        sweeps = sweeps_for("pcee", ordering.rows.exits)
        try:
            certification = certify_max_drop(ordering, testing, sweeps, max_drop, confidence, grid_size=30)
        except CalibrationError:
            continue  # nothing certified: no claim made, so none violated
        violations += true_risk(certification.chosen.outcome.point) > max_drop
        naive_violations += true_risk(most_aggressive_within(testing, sweeps, max_drop).point) > max_drop
    assert violations / trials <= 1 - confidence
    assert naive_violations / trials > 2 * (1 - confidence), "the problem should punish uncorrected selection"


def most_aggressive_within(testing: Simulator, sweeps, max_drop: float):
    """Uncorrected selection: the fastest grid point whose empirical loss rate is at most D."""
    full = testing.run(FULL_MODEL)
    outcomes = [
        testing.run(sweep.point(index))
        for sweep in sweeps
        for index in range(0, len(sweep), max(1, len(sweep) // 30))
    ]
    within = [
        o
        for o in outcomes
        if drop_losses(o.predictions, full.predictions, testing.rows.labels).mean() <= max_drop
    ]
    return max(within, key=lambda outcome: outcome.layer_speedup)


def test_too_few_rows_to_certify_is_a_clear_error():
    rows = synthetic_rows(seed=12, count=60)
    with pytest.raises(
        CalibrationError, match=r"no operating point.*can be certified.*needs \d+ testing rows"
    ):
        calibrate(rows, "accuracy", Objective(max_drop=0.01, confidence=0.95))


# ------------------------------------------------------------------ inputs


def test_bad_objectives_and_splits_are_named():
    with pytest.raises(CalibrationError, match="exactly one objective"):
        Objective(target_speedup=0.5, max_drop=0.01)
    with pytest.raises(CalibrationError, match="strictly between 0 and 1"):
        Objective(target_speedup=1.5)
    with pytest.raises(CalibrationError, match="cannot be split"):
        split_rows(1, 0.2, 0, ("search", "held-out"))
    with pytest.raises(CalibrationError, match="no rows"):
        CalibrationRows(
            AllExits(np.zeros((0, 3, 2)), np.zeros((0, 3)), np.zeros((0, 3))), np.zeros(0, dtype=int)
        )


def test_data_labels_map_to_the_bundle_by_name():
    dataset = TextDataset(["a", "b", "c"], None, [0, 1, 0], ("negative", "positive"), "reviews.csv")
    assert bundle_label_indices(dataset, ["positive", "negative"]).tolist() == [1, 0, 1]
    with pytest.raises(CalibrationError, match=r"labels \['negative'\] are not labels of this bundle"):
        bundle_label_indices(dataset, ["positive", "neutral"])


# ------------------------------------------------------------------ manifest


def test_previous_points_stay_by_name():
    initial = OperatingPoint("pcee", tau=0.3, patience=2)
    first = OperatingPoint("pcee", tau=0.5, patience=1, name="speedup-0.50")
    points = merged_points(initial, [], first)
    assert [point.name for point in points] == ["initial", "speedup-0.50"]
    again = merged_points(first, points, OperatingPoint("pcee", tau=0.6, patience=1, name="speedup-0.50"))
    assert [point.name for point in again] == ["initial", "speedup-0.50"] and again[-1].tau == 0.6


def test_a_crash_while_writing_the_manifest_leaves_the_old_one(bundle: Path, monkeypatch):
    before = (bundle / MANIFEST_NAME).read_bytes()

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr("pcee.runtime.atomic.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        record_operating_point(
            bundle,
            OperatingPoint("pcee", tau=0.9, patience=1, name="speedup-0.30"),
            {"mode": "target-speedup"},
        )
    assert (bundle / MANIFEST_NAME).read_bytes() == before
    assert Manifest.load(bundle).operating_point.name == "default"
    assert sorted(path.name for path in bundle.iterdir()) == [
        ".manifest.lock",
        "manifest.json",
        "onnx",
        "tokenizer",
    ]


# ------------------------------------------------------------------ command line


def test_calibrate_writes_the_point_report_and_cache(
    bundle: Path, data_csv: Path, tmp_path: Path, monkeypatch
):
    arguments = [
        bundle,
        "--data",
        data_csv,
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--target-speedup",
        "0.3",
        "--json",
    ]
    first = calibrate_cli(*arguments, "--report-dir", tmp_path / "report")
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert document["operating_point"]["name"] == "speedup-0.30"
    assert {"layer_speedup", "metric"} <= set(document["calibration"]) and {"layer_speedup", "metric"} <= set(
        document["holdout"]
    )
    assert document["metric_name"] == "accuracy" and "metric" in document["full_model"]
    assert document["recording"]["from_cache"] is False
    assert {path.name for path in (tmp_path / "report" / "speedup-0.30").iterdir()} >= {
        "calibration-report.json",
        "calibration-frontier.csv",
    }
    manifest = Manifest.load(bundle)
    assert manifest.operating_point.tau == document["operating_point"]["tau"]
    assert [point.name for point in manifest.operating_points] == ["default", "speedup-0.30"]
    assert manifest.calibration["holdout"] == document["holdout"]

    def no_model_time(*_args, **_kwargs):
        raise AssertionError("the second calibration should read the cache")

    monkeypatch.setattr(EarlyExitRuntime, "run_all_exits", no_model_time)
    second = calibrate_cli(*arguments[:-3], "--target-speedup", "0.2", "--dry-run", "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["recording"]["from_cache"] is True
    assert Manifest.load(bundle).operating_point.name == "speedup-0.30"


def test_eval_runs_the_real_runtime_at_a_given_point(bundle: Path, data_csv: Path):
    result = CliRunner().invoke(
        eval_main,
        [
            str(bundle),
            "--data",
            str(data_csv),
            "--text-column",
            "text",
            "--label-column",
            "label",
            "--policy",
            "budgeted",
            "--layer",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)
    assert {"layer_speedup", "metric", "metric_name", "exit_histogram", "wall_time_s"} <= set(evaluation)
    assert evaluation["exit_histogram"] == [0, 120, 0] and evaluation["layer_speedup"] == pytest.approx(
        1 / 3, abs=1e-6
    )


def relabel_bundle(bundle: Path, labels: list[str]) -> None:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["model"]["labels"] = labels
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "case, message",
    [
        ("bundle without labels", "model.num_labels is 2 but model.labels lists 0 names"),
        ("unknown data labels", "are not labels of this bundle"),
        ("unreachable target", "reachable layer speed-ups are"),
        ("empty data set", "a header but no data rows"),
    ],
)
def test_bad_inputs_get_clear_errors(case: str, message: str, bundle: Path, data_csv: Path, tmp_path: Path):
    data, target = data_csv, "0.3"
    if case == "bundle without labels":
        relabel_bundle(bundle, [])
    elif case == "unknown data labels":
        data = write_labelled_csv(tmp_path / "sentiment.csv", 20, labels=("pos", "neg"))
    elif case == "unreachable target":
        target = "0.9"
    else:
        data = tmp_path / "empty.csv"
        data.write_text("text,label\n")
    result = calibrate_cli(
        bundle, "--data", data, "--text-column", "text", "--label-column", "label", "--target-speedup", target
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ") and re.search(message, result.output), result.output
