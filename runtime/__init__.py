"""PCEE early-exit runtime: torch-free (numpy, tokenizers, onnxruntime or TensorRT).

    from pcee.runtime import EarlyExitRuntime
    runtime = EarlyExitRuntime.from_bundle("runs/sst2-pcee")
    result = runtime.predict(["a gripping, funny film"])

This module's names are the runtime's public surface: the other rooms (exporter, calibration,
benchmarks, serving) import from here, never from a backend module.
"""

from .atomic import (
    backup_directory_for,
    replace_directory,
    staging_directory_for,
    staging_directory_pattern,
    temporary_file_pattern,
    write_file_atomically,
    written_before_this_process,
)
from .backends import BACKEND_NAMES, create_backend, tensorrt_version_problem
from .backends.base import Backend
from .backends.onnxruntime_cpu import open_cpu_session
from .backends.single_graph import SingleGraphSession
from .engine import EarlyExitRuntime, PredictionResult, RowPrediction
from .errors import BackendError, BackendUnavailableError, BundleError, InputError, PceeError, PolicyError
from .exits import AllExits, BatchOutcome, ExitRecord, layer_speedup, softmax
from .extras import is_importable, require_extra
from .graphs import EngineChain, GraphChain, GraphSpec, LocatedGraph, layer_graph_name
from .layout import (
    CACHE_DIR,
    ENGINE_DIR,
    GRAPH_DIR,
    MANIFEST_LOCK,
    REPORTS_DIR,
    TIMING_CACHE_NAME,
    TOKENIZER_DIR,
    TOKENIZER_JSON,
    engine_file,
    is_bundle_entry,
    onnx_file,
    report_folders,
    tokenizer_file,
)
from .loop import (
    DEFAULT_BATCH_SIZE,
    length_sorted_chunks,
    record_every_exit,
    replay,
    run_early_exit,
    run_every_exit,
    run_in_chunks,
)
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TASK_TYPES,
    FileEntry,
    GraphFile,
    Manifest,
    ModelInfo,
    ParityResult,
    QuantizationResult,
    TensorRTEngines,
    TokenizerInfo,
    graph_chain_of,
    manifest_lock,
    merged_points,
    record_operating_point,
    sha256_of,
    write_json_atomically,
)
from .policies import POLICY_NAMES, SIGNALS, ExitPolicy, OperatingPoint, build_policy
from .tokenization import BundleTokenizer, EncodedBatch

__all__ = [
    "backup_directory_for",
    "replace_directory",
    "staging_directory_for",
    "staging_directory_pattern",
    "temporary_file_pattern",
    "write_file_atomically",
    "written_before_this_process",
    "BACKEND_NAMES",
    "Backend",
    "create_backend",
    "open_cpu_session",
    "SingleGraphSession",
    "tensorrt_version_problem",
    "EarlyExitRuntime",
    "PredictionResult",
    "RowPrediction",
    "BackendError",
    "BackendUnavailableError",
    "BundleError",
    "InputError",
    "PceeError",
    "PolicyError",
    "is_importable",
    "require_extra",
    "AllExits",
    "BatchOutcome",
    "ExitRecord",
    "layer_speedup",
    "softmax",
    "EngineChain",
    "GraphChain",
    "GraphSpec",
    "LocatedGraph",
    "layer_graph_name",
    "CACHE_DIR",
    "ENGINE_DIR",
    "GRAPH_DIR",
    "MANIFEST_LOCK",
    "REPORTS_DIR",
    "TIMING_CACHE_NAME",
    "TOKENIZER_DIR",
    "TOKENIZER_JSON",
    "engine_file",
    "onnx_file",
    "is_bundle_entry",
    "report_folders",
    "tokenizer_file",
    "DEFAULT_BATCH_SIZE",
    "length_sorted_chunks",
    "record_every_exit",
    "replay",
    "run_early_exit",
    "run_every_exit",
    "run_in_chunks",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TASK_TYPES",
    "FileEntry",
    "GraphFile",
    "Manifest",
    "ModelInfo",
    "ParityResult",
    "QuantizationResult",
    "TensorRTEngines",
    "TokenizerInfo",
    "graph_chain_of",
    "manifest_lock",
    "merged_points",
    "record_operating_point",
    "sha256_of",
    "write_json_atomically",
    "POLICY_NAMES",
    "SIGNALS",
    "ExitPolicy",
    "OperatingPoint",
    "build_policy",
    "BundleTokenizer",
    "EncodedBatch",
]
