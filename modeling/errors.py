"""User-facing errors of the modeling room: each says what was received, what was expected, what to do."""

from pcee.runtime import PceeError


class ModelingError(PceeError, ValueError):
    """Base class for problems with a model directory, backbone or training setup."""


class UnsupportedArchitectureError(ModelingError):
    """The backbone's `model_type` has no adapter."""


class ModelDirectoryError(ModelingError):
    """A model directory is missing, incomplete or corrupt."""
