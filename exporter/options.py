"""What pcee-export can be asked for: `ExportOptions`, which checks itself when built, and every default.

Torch-free, so `pcee-export --help` starts fast and a bad option fails before any model is loaded.
Each error names the option, the value received and what is expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from pcee.runtime import TASK_TYPES

from .errors import ExportError, OpsetError

DEFAULT_OPSET = 17
MIN_OPSET = 14  # the oldest opset whose export is parity-tested here
MAX_OPSET = 20  # the newest opset torch's TorchScript exporter writes
FUSION_MIN_OPSET = 17  # the optimizer writes LayerNormalization nodes, an opset-17 operator
QUANTIZATIONS = ("int8",)
# The int8 chain's last exit must predict the float model's label on this share of rows. Measured on the
# 1-epoch demo MiniLM (SST-2 dev): 0.975-0.98 at an accuracy cost of 0.1-0.6 points, so 0.98 would
# refuse a bundle whose accuracy is within noise of the float one.
DEFAULT_MIN_AGREEMENT = 0.97
DEFAULT_MAX_BATCH_SIZE = 32  # the largest batch TensorRT engines accept unless asked otherwise

# Parity with PyTorch: the largest difference of any exit output the export accepts.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2
TENSORRT_FP32_TOLERANCE = 5e-3  # TensorRT may run float32 matmuls in TF32 (10 mantissa bits)

# The operating point a new bundle starts with. Normalized entropy 0.3 is a binary exit with max
# probability ~0.95; two such exits in a row make a conservative start that stays close to full-model
# accuracy. pcee-calibrate replaces it with a point chosen for a target speed-up on the user's data.
DEFAULT_POINT_NAME = "default"
DEFAULT_POINT_SOURCE = "export default (uncalibrated)"
DEFAULT_TAU = 0.3
DEFAULT_PATIENCE = 2

BOOLEAN_OPTIONS = ("fp16", "tensorrt", "with_full_graph", "progress", "fuse")


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    tensorrt: bool = False
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_seq_len: int | None = None  # None: the model's own max_seq_len
    task_type: str | None = None  # "single_sentence" or "sentence_pair"; None: what the model's config says
    with_full_graph: bool = False
    progress: bool = False
    # onnxruntime's transformer fusions: the fused float chain measured 1.02-1.03x (batch 1) and 0.99x
    # (batch 32) the portable chain's rows/s at a 50% point (docs/RESULTS.md). TensorRT, fp16 and
    # pre-17 opset bundles always get portable graphs.
    fuse: bool = True
    quantize: str | None = None  # "int8": dynamic quantization of the layer graphs' weights
    parity_data: Path | None = None  # labelled rows an int8 bundle's agreement and accuracy are measured on
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    def __post_init__(self):
        if self.parity_data is not None:
            object.__setattr__(self, "parity_data", Path(self.parity_data))
        for name in BOOLEAN_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise ExportError(f"{flag(name)} is {getattr(self, name)!r}; expected True or False")
        check_opset(self.opset)
        require_count("max_batch_size", self.max_batch_size)
        if self.max_seq_len is not None:
            require_count("max_seq_len", self.max_seq_len, "; leave it out to use the model's own")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ExportError(
                f"--task-type {self.task_type!r} is not one of {', '.join(TASK_TYPES)}; leave it out to use the model's own"
            )
        self.check_quantization()

    def check_quantization(self) -> None:
        if self.quantize is None:
            if self.parity_data is not None:
                raise ExportError(
                    "--parity-data measures an int8 bundle's agreement with the float model; add --quantize int8, or drop --parity-data"
                )
            return
        if self.quantize not in QUANTIZATIONS:
            raise ExportError(f"--quantize {self.quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.fp16 or self.tensorrt:
            raise ExportError(
                "--quantize int8 quantizes onnxruntime CPU graphs; it does not combine with --fp16 or --tensorrt. Drop one of them"
            )
        agreement = self.min_agreement
        if isinstance(agreement, bool) or not isinstance(agreement, Real) or not 0 <= agreement <= 1:
            raise ExportError(
                f"--min-agreement {agreement!r} must be a number between 0 and 1, e.g. {DEFAULT_MIN_AGREEMENT}"
            )
        if self.parity_data is not None and not self.parity_data.exists():
            raise ExportError(
                f"--parity-data {self.parity_data}: no such file or directory; pass a GLUE task directory or a "
                "labelled file of the model's task"
            )

    @property
    def fuses(self) -> bool:
        return self.fuse and not (self.fp16 or self.tensorrt) and self.opset >= FUSION_MIN_OPSET

    @property
    def precision(self) -> str:
        return self.quantize or ("fp16" if self.fp16 else "fp32")

    @property
    def parity_tolerance(self) -> float:
        return FP16_TOLERANCE if self.fp16 else FP32_TOLERANCE

    @property
    def engine_tolerance(self) -> float:
        return FP16_TOLERANCE if self.fp16 else TENSORRT_FP32_TOLERANCE


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require_count(name: str, value, advice: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportError(f"{flag(name)} {value!r} must be a whole number of at least 1{advice}")


def check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OpsetError(
            f"--opset {opset} is not supported; pcee-export writes opsets {MIN_OPSET} to {MAX_OPSET} "
            f"(default {DEFAULT_OPSET}). Pass --opset {DEFAULT_OPSET} unless your runtime needs another."
        )
