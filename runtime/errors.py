"""The one error family of pcee: every room's errors derive from `PceeError`.

Each message names what was received, what was expected, and what to do. The rooms add their
own subclasses (`ExportError`, `CalibrationError`, `DataError`, `ModelingError`); every CLI
catches `PceeError` once. The family lives here because the runtime imports no other room.
"""


class PceeError(Exception):
    """Base class of everything pcee raises on purpose."""


class BundleError(PceeError, ValueError):
    """A bundle directory or its manifest is missing, corrupt, or from an incompatible version."""


class InputError(PceeError, ValueError):
    """A prediction request is malformed (empty text, wrong type, bad token ids)."""


class PolicyError(PceeError, ValueError):
    """An operating point names an unknown policy or out-of-range thresholds."""


class BackendUnavailableError(PceeError, RuntimeError):
    """The requested backend (TensorRT, CUDA) cannot run on this machine; the message says what is missing."""


class BackendError(PceeError, RuntimeError):
    """A backend failed while running (a CUDA or TensorRT call refused); the message names the call."""
