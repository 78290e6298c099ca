"""Typed errors of the calibration room."""


class CalibrationError(ValueError):
    """Calibration cannot go on; the message says what was received, what was expected, and what to do."""
