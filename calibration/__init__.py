"""Calibration: record every exit of a bundle once, simulate every policy exactly, choose an operating point.

No torch here: numpy, the runtime, and matplotlib (imported lazily, for plots only).

    from pcee.calibration import CalibrationRows, Objective, calibrate
    result = calibrate(CalibrationRows(exits, labels), "accuracy", Objective(target_speedup=0.5))
"""

from .calibrate import CalibrationResult, Objective, calibrate
from .errors import CalibrationError, OptionError
from .options import CalibrationOptions, EvaluationOptions, LabelledData, RunSettings
from .simulate import CalibrationRows, Outcome, Simulator, simulate

__all__ = [
    "CalibrationError",
    "CalibrationOptions",
    "CalibrationResult",
    "CalibrationRows",
    "EvaluationOptions",
    "LabelledData",
    "Objective",
    "OptionError",
    "Outcome",
    "RunSettings",
    "Simulator",
    "calibrate",
    "simulate",
]
