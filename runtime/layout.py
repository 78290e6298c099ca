"""The bundle's layout: the name of every file and folder a bundle directory holds, in one place.

    manifest.json        the manifest (runtime.manifest reads and writes it)
    onnx/                the graphs: embeddings.onnx, layer_01.onnx ..., full_model.onnx (pcee-export)
    trt/                 the TensorRT engines and their timing cache (pcee-export --tensorrt)
    tokenizer/           tokenizer.json and the model's other tokenizer files (pcee-export)
    reports/NAME/        one calibration report per operating point name (pcee-calibrate)
    .pcee-cache/         recorded exits, so calibrating again on the same data costs no model run
    .manifest.lock       the lock every read-merge-write of the manifest holds
    .manifest.json.*     the temporary file of an atomic manifest write that a kill left behind

Older pcee-calibrate versions wrote their reports as calibration-* files at the top.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

MANIFEST_NAME = "manifest.json"
GRAPH_DIR = "onnx"
ENGINE_DIR = "trt"
TIMING_CACHE_NAME = "timing.cache"  # inside trt/: what TensorRT learned while building the engines
TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"
REPORTS_DIR = "reports"
CACHE_DIR = ".pcee-cache"
MANIFEST_LOCK = ".manifest.lock"
LEGACY_REPORT_PATTERN = "calibration-*"
ENTRY_PATTERNS = (
    MANIFEST_NAME,
    GRAPH_DIR,
    ENGINE_DIR,
    TOKENIZER_DIR,
    REPORTS_DIR,
    CACHE_DIR,
    MANIFEST_LOCK,
    LEGACY_REPORT_PATTERN,
    f".{MANIFEST_NAME}.*",
)


def onnx_file(name: str) -> str:
    """Where graph `name` ("embeddings", "layer_01", "full_model") lies, relative to the bundle."""
    return f"{GRAPH_DIR}/{name}.onnx"


def engine_file(graph_stem: str) -> str:
    return f"{ENGINE_DIR}/{graph_stem}.engine"


def tokenizer_file(name: str) -> str:
    return f"{TOKENIZER_DIR}/{name}"


def is_bundle_entry(name: str) -> bool:
    """Whether a top-level entry named `name` is one that pcee writes into a bundle directory."""
    return any(fnmatchcase(name, pattern) for pattern in ENTRY_PATTERNS)


def report_folders(bundle_dir: Path) -> list[str]:
    """The calibration reports a bundle holds, relative to it: reports/NAME folders and older calibration-* files."""
    reports = bundle_dir / REPORTS_DIR
    folders = sorted(f"{REPORTS_DIR}/{entry.name}" for entry in reports.iterdir()) if reports.is_dir() else []
    legacy = sorted(entry.name for entry in bundle_dir.glob(LEGACY_REPORT_PATTERN))
    return folders + legacy
