"""Typed errors of the calibration room."""

from pcee.runtime import PceeError


class CalibrationError(PceeError, ValueError):
    """Calibration cannot go on; the message says what was received, what was expected, and what to do."""


class OptionError(CalibrationError):
    """An option of pcee-calibrate / pcee-eval is out of its range; the CLIs show it as a usage error."""
