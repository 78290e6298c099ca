"""Typed, user-facing errors of the runtime. Each names what was received, what was expected, what to do."""


class PceeRuntimeError(Exception):
    """Base class of everything the runtime raises on purpose."""


class BundleError(PceeRuntimeError, ValueError):
    """A bundle directory or its manifest is missing, corrupt, or from an incompatible version."""


class InputError(PceeRuntimeError, ValueError):
    """A prediction request is malformed (empty text, wrong type, bad token ids)."""


class PolicyError(PceeRuntimeError, ValueError):
    """An operating point names an unknown policy or out-of-range thresholds."""


class BackendUnavailableError(PceeRuntimeError, RuntimeError):
    """The requested backend (TensorRT, CUDA) cannot run on this machine; the message says what is missing."""
