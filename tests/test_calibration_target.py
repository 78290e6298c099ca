"""A target speed-up means the target: the band rule, going further only past the noise, and what is said.

The recordings below are built so that the best-metric point lies far above the target: every row's
first exit is its most accurate one, so exiting everything at layer 1 scores best.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pcee.calibration import CalibrationRows, Objective, Simulator, calibrate
from pcee.calibration.calibrate import holdout_split
from pcee.calibration.noise import SignTest, metric_interval
from pcee.calibration.report import format_table
from pcee.calibration.search import TARGET_BAND, all_states, best_reaching, sweeps_for
from pcee.runtime import AllExits, softmax

LAYERS = 6


def early_exits_best(count: int, first_layer_right: float, later_right: float, seed: int) -> CalibrationRows:
    """Layer 1 is right with probability `first_layer_right`, each later layer with `later_right`; the
    entropies are uniform and independent of the answers, so every tau mixes early and late exits."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, size=count)
    right = np.concatenate(
        [rng.random((count, 1)) < first_layer_right, rng.random((count, LAYERS - 1)) < later_right], axis=1
    )
    predicted = np.where(right, labels[:, None], 1 - labels[:, None])
    logits = np.where(np.arange(2) == predicted[..., None], 2.0, -2.0).astype(np.float32)
    entropy = rng.random((count, LAYERS)).astype(np.float32)
    return CalibrationRows(AllExits(logits, entropy, softmax(logits).max(axis=-1)), labels)


def test_the_band_rule_keeps_the_target_when_the_best_metric_lies_far_above_it():
    rows = early_exits_best(400, first_layer_right=1.0, later_right=0.6, seed=1)
    search = Simulator(rows.subset(holdout_split(len(rows), 0.2, 0)[0]), "accuracy")
    old_rule = best_reaching(all_states(search, sweeps_for("pcee", search.rows.exits)), 0.5)
    assert old_rule.layer_speedup > 0.8, "the recording must put the best metric far above the target"

    result = calibrate(rows, "accuracy", Objective(target_speedup=0.5))
    assert 0.5 <= result.chosen.layer_speedup <= 0.5 + TARGET_BAND
    assert result.chosen.metric < old_rule.metric
    assert (
        result.target.further is None
        and result.target.band_choice.point.describe() == result.point.describe()
    )
    summary = result.to_dict()["target"]
    assert summary["requested"] == 0.5 and not summary["went_further"]
    assert summary["calibration_speedup"] == round(result.chosen.layer_speedup, 6)
    assert summary["holdout_speedup"] == round(result.holdout.layer_speedup, 6)


def test_at_least_goes_further_when_the_gain_beats_the_noise():
    rows = early_exits_best(400, first_layer_right=1.0, later_right=0.6, seed=1)
    result = calibrate(rows, "accuracy", Objective(target_speedup=0.5, at_least=True))
    further = result.target.further
    assert further.accepted and result.point.describe() == further.outcome.point.describe()
    assert result.chosen.layer_speedup > 0.8
    assert further.test.p_value <= 0.05 / further.candidates
    capped = calibrate(rows, "accuracy", Objective(target_speedup=0.5, max_speedup=0.7))
    assert 0.5 + TARGET_BAND < capped.chosen.layer_speedup <= 0.7


def test_at_least_stays_in_the_band_when_the_gain_is_noise():
    rows = early_exits_best(60, first_layer_right=0.64, later_right=0.6, seed=3)
    result = calibrate(rows, "accuracy", Objective(target_speedup=0.5, at_least=True))
    further = result.target.further
    assert further is not None, "a faster point should score higher on these rows, by chance"
    assert not further.accepted and further.outcome.metric > result.chosen.metric
    assert 0.5 <= result.chosen.layer_speedup <= 0.5 + TARGET_BAND
    assert "not taken: its gain is within noise" in format_table(result)


def test_an_integer_knob_takes_its_smallest_speedup_reaching_the_target():
    rows = early_exits_best(200, first_layer_right=1.0, later_right=0.6, seed=2)
    result = calibrate(rows, "accuracy", Objective(target_speedup=0.4), policy="budgeted")
    assert result.point.layer == 3 and result.chosen.layer_speedup == 0.5  # layers 4..1: 1/3, 1/2, 2/3, 5/6


def test_the_table_and_the_json_say_what_was_chosen_and_warn():
    rows = early_exits_best(200, first_layer_right=1.0, later_right=0.6, seed=4)
    result = calibrate(rows, "accuracy", Objective(target_speedup=0.5))
    table = format_table(result)
    assert "Requested layer speed-up 0.5 (band 0.5 to 0.52 on the search rows)" in table
    assert "95% interval" in table and "Small data: 160 search rows" in table
    low, high = result.intervals["holdout"]
    assert low <= result.holdout.metric <= high and f"[{low:.3f}, {high:.3f}]" in table

    missed = replace(
        result,
        holdout=replace(result.holdout, layer_speedup=0.6),
        full_versus_holdout=SignTest(wins=12, losses=1),
    )
    missed = replace(missed, full_holdout=replace(result.full_holdout, metric=result.holdout.metric + 0.1))
    warnings = missed.to_dict()["warnings"]
    assert len(warnings) == 2
    assert "below the full model's" in warnings[0] and "p = 0.0017" in warnings[0]
    assert "misses the requested 0.5 by more than 0.05" in warnings[1]
    assert "Warning: held-out layer speed-up 0.6000 misses" in format_table(missed)
    assert replace(missed, full_versus_holdout=SignTest(wins=3, losses=1)).warnings == [warnings[1]]


def test_the_sign_test_and_the_interval():
    assert SignTest(5, 0).p_value == pytest.approx(1 / 32)
    assert SignTest(0, 0).p_value == 1.0 and SignTest(0, 4).p_value == 1.0
    assert SignTest(3, 1).p_value == pytest.approx(5 / 16)
    labels = np.random.default_rng(0).integers(2, size=400)
    predictions = np.where(np.random.default_rng(1).random(400) < 0.8, labels, 1 - labels)
    wide = metric_interval("accuracy", predictions[:50], labels[:50])
    narrow = metric_interval("accuracy", predictions, labels)
    assert narrow[0] <= float(np.mean(predictions == labels)) <= narrow[1]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    low, high = metric_interval("matthews", predictions, labels)
    assert low < high
