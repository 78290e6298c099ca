"""Typed calibration options: they check themselves when built, and the CLIs leave the checks to them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pcee.calibration import Objective
from pcee.calibration.cli import calibrate_main, eval_main
from pcee.calibration.errors import CalibrationError, OptionError
from pcee.calibration.options import CalibrationOptions, EvaluationOptions, LabelledData, RunSettings

DATA = LabelledData("reviews.csv", text_column="text", label_column="label")
TARGET = Objective(target_speedup=0.5)


def test_good_options_are_typed():
    options = CalibrationOptions(DATA, TARGET, policy="pabee", report_dir="out", run=RunSettings("auto", 8))
    assert options.data.path == Path("reviews.csv") and options.report_dir == Path("out")
    assert options.holdout_fraction == 0.2 and options.run.batch_size == 8 and options.progress
    assert EvaluationOptions(DATA, patience=2, tau=0.3).patience == 2


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Objective(0.5, 0.01), "exactly one objective"),
        (lambda: Objective(), "exactly one objective"),
        (
            lambda: Objective(target_speedup=1.0),
            "--target-speedup must lie strictly between 0 and 1, got 1.0",
        ),
        (lambda: Objective(max_drop=0.01, confidence=0), "--confidence must lie strictly between 0 and 1"),
        (lambda: Objective(target_speedup="0.5"), "--target-speedup must lie strictly"),
        (lambda: CalibrationOptions(DATA, TARGET, policy="full"), "--policy 'full' is not one of pcee"),
        (lambda: CalibrationOptions(DATA, TARGET, holdout_fraction=1), "--holdout-fraction must lie"),
        (lambda: CalibrationOptions(DATA, TARGET, seed=1.5), "--seed must be an integer"),
        (
            lambda: CalibrationOptions(DATA, TARGET, name="../escape"),
            "--name '../escape' cannot name a point",
        ),
        (lambda: RunSettings(backend="gpu"), "--backend 'gpu' is not one of auto"),
        (lambda: RunSettings(batch_size=0), "--batch-size must be at least 1, got 0"),
        (lambda: LabelledData("x.csv", text_column=""), "--text-column must be a non-empty name"),
        (lambda: EvaluationOptions(DATA, policy="nope"), "--policy 'nope' is not one of"),
        (lambda: EvaluationOptions(DATA, patience=0), "--patience must be at least 1"),
        (lambda: EvaluationOptions(DATA, tau="low"), "--tau must be a number"),
        (lambda: EvaluationOptions(DATA, holdout_of="a b"), "--holdout-of 'a b' cannot name a point"),
    ],
)
def test_bad_options_name_the_flag_and_the_value(build, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(".", r"\.")) as caught:
        build()
    assert isinstance(caught.value, CalibrationError)


@pytest.mark.parametrize(
    "command, arguments, message",
    [
        (calibrate_main, ["--target-speedup", "0.5", "--max-drop", "0.01"], "exactly one objective"),
        (calibrate_main, ["--target-speedup", "1.5"], "--target-speedup must lie strictly between 0 and 1"),
        (calibrate_main, ["--target-speedup", "0.5", "--policy", "full"], "--policy 'full' is not one of"),
        (calibrate_main, ["--target-speedup", "0.5", "--batch-size", "0"], "--batch-size must be at least 1"),
        (eval_main, ["--patience", "0"], "--patience must be at least 1"),
        (eval_main, ["--backend", "gpu"], "--backend 'gpu' is not one of"),
    ],
)
def test_the_clis_report_bad_options_as_usage_errors(command, arguments, message, tmp_path: Path):
    """Checked before the bundle is opened: the bundle below does not exist."""
    result = CliRunner().invoke(command, [str(tmp_path / "no-bundle"), "--data", "x.csv", *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_the_help_still_lists_the_choices():
    help_text = CliRunner().invoke(calibrate_main, ["--help"]).output
    assert "[pcee|pcee-maxprob|pcee-learned|pabee|branchynet|shallow-deep|budgeted]" in help_text
