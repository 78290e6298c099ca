"""Typed, user-facing errors of the exporter: each names what was received, what was expected, what to do."""

from __future__ import annotations

from dataclasses import dataclass

from pcee.runtime import PceeError


class ExportError(PceeError, ValueError):
    """Base class of everything pcee-export raises on purpose."""


class OpsetError(ExportError):
    """The requested ONNX opset is older than the exporter supports."""


class OutputDirectoryError(ExportError):
    """The output path exists and is not a pcee bundle that may be replaced."""


class CalibratedOutputError(OutputDirectoryError):
    """The output is a bundle with saved operating points or calibration reports that replacing it would delete."""

    def __init__(self, message: str, points: list[str], reports: list[str]):
        super().__init__(message)
        self.points = points
        self.reports = reports


class TokenizerError(ExportError):
    """The model directory's tokenizer cannot serve this model: unreadable, not BERT WordPiece, or of another vocabulary size."""


class TensorRTUnavailableError(ExportError):
    """--tensorrt was asked for on a machine without the tensorrt package or without an NVIDIA GPU."""


class EngineBuildError(ExportError):
    """TensorRT could not parse a graph or build its engine."""


@dataclass(frozen=True)
class OutputMismatch:
    graph: str  # "layer_02", "full"
    output: str
    max_abs_diff: float


class ParityError(ExportError):
    """The exported graphs disagree with the PyTorch model beyond the tolerance."""

    def __init__(self, mismatches: list[OutputMismatch], tolerance: float):
        self.mismatches = mismatches
        self.tolerance = tolerance
        details = "; ".join(f"{m.graph} {m.output}: max |diff| {m.max_abs_diff:.3g}" for m in mismatches)
        super().__init__(
            f"exported graphs disagree with the PyTorch model beyond tolerance {tolerance:g} ({details}). "
            "The bundle was not written. Check that the model loads and runs in PyTorch, try the default opset, "
            "and report the architecture if it persists."
        )
