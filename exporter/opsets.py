"""The ONNX opsets and quantizations pcee-export writes (kept apart from the torch-heavy modules so the CLI starts fast)."""

from __future__ import annotations

from .errors import OpsetError

DEFAULT_OPSET = 17
MIN_OPSET = 14  # the oldest opset whose export is parity-tested here
MAX_OPSET = 20  # the newest opset torch's TorchScript exporter writes
FUSION_MIN_OPSET = 17  # the optimizer writes LayerNormalization nodes, an opset-17 operator
QUANTIZATIONS = ("int8",)
# The int8 chain's last exit must predict the float model's label on this share of rows. Measured on the
# 1-epoch demo MiniLM (SST-2 dev): 0.975-0.98 at an accuracy cost of 0.1-0.6 points, so 0.98 would
# refuse a bundle whose accuracy is within noise of the float one.
DEFAULT_MIN_AGREEMENT = 0.97


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OpsetError(
            f"--opset {opset} is not supported; pcee-export writes opsets {MIN_OPSET} to {MAX_OPSET} "
            f"(default {DEFAULT_OPSET}). Pass --opset {DEFAULT_OPSET} unless your runtime needs another."
        )
