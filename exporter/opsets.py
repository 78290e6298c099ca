"""The ONNX opsets pcee-export writes (kept apart from the torch-heavy modules so the CLI starts fast)."""

from __future__ import annotations

from .errors import OpsetError

DEFAULT_OPSET = 17
MIN_OPSET = 14  # the oldest opset whose export is parity-tested here
MAX_OPSET = 20  # the newest opset torch's TorchScript exporter writes


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OpsetError(
            f"--opset {opset} is not supported; pcee-export writes opsets {MIN_OPSET} to {MAX_OPSET} "
            f"(default {DEFAULT_OPSET}). Pass --opset {DEFAULT_OPSET} unless your runtime needs another."
        )
