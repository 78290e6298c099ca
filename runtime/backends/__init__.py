"""Backend selection: the names users pass, and what 'auto' picks on this machine.

A backend is built from what it runs: the chain of graphs and, for TensorRT, the engines.
"""

from __future__ import annotations

import re
import warnings

from ..errors import BackendUnavailableError, InputError
from ..graphs import EngineChain, GraphChain
from .base import Backend

BACKEND_NAMES = (
    "auto",
    "onnxruntime",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "onnxruntime-single-graph",
    "tensorrt",
)
# From 10.1 (device_memory_size_v2, IExecutionContext.set_device_memory) up to, not including, 12: the
# majors whose Python API the TensorRT backend and the exporter are written to (TensorRT 11 removed
# the weak-typing builder flags and device_memory_size; 12 is unknown).
MIN_TENSORRT = (10, 1)
BELOW_TENSORRT_MAJOR = 12
DEFAULT_MAX_CONCURRENCY = 4  # TensorRT context sets (execution contexts, stream, buffers) per backend


def tensorrt_version_problem(version: str) -> str | None:
    """What is wrong with TensorRT `version` for pcee, or None when it is supported."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if MIN_TENSORRT <= found and found[0] < BELOW_TENSORRT_MAJOR:
        return None
    minimum = ".".join(map(str, MIN_TENSORRT))
    return f"TensorRT {minimum} or newer, below {BELOW_TENSORRT_MAJOR} (found {version}), which pip install 'pcee[gpu]' installs"


def cuda_provider_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def create_backend(
    name: str,
    chain: GraphChain,
    engines: EngineChain | None = None,
    intra_op_threads: int | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
) -> Backend:
    """The backend `name` over `chain` (and `engines` for TensorRT); 'auto' picks the best that runs here.

    'onnxruntime-single-graph' runs the chain's whole-model graph instead (full operating point only).

    max_concurrency: how many callers the TensorRT backend serves at once; more wait for one to finish.
    """
    if name not in BACKEND_NAMES:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        if engines is not None and tensorrt_available():
            try:
                return create_tensorrt_backend(chain, engines, max_concurrency)
            except BackendUnavailableError as error:
                warnings.warn(
                    f"TensorRT engines cannot run here ({error}); using onnxruntime",
                    RuntimeWarning,
                    stacklevel=2,
                )
        name = "onnxruntime"
    if name == "tensorrt":
        return create_tensorrt_backend(chain, engines, max_concurrency)
    if name == "onnxruntime-single-graph":
        return create_single_graph_backend(chain, intra_op_threads)
    if name == "onnxruntime-cuda" or (name == "onnxruntime" and cuda_provider_available()):
        return create_cuda_backend(
            chain, explicit=name == "onnxruntime-cuda", intra_op_threads=intra_op_threads
        )
    if name == "onnxruntime":
        warn_about_a_broken_gpu_wheel()
    return create_cpu_backend(chain, intra_op_threads)


def warn_about_a_broken_gpu_wheel() -> None:
    """onnxruntime-gpu is installed yet offers no CUDA: say so, rather than serve on the CPU in silence."""
    from .onnxruntime_cuda import broken_gpu_wheel

    problem = broken_gpu_wheel()
    if problem is not None:
        warnings.warn(f"serving on the CPU: {problem}", RuntimeWarning, stacklevel=3)


def create_cpu_backend(chain: GraphChain, intra_op_threads: int | None) -> Backend:
    from .onnxruntime_cpu import OnnxRuntimeCpuBackend

    return OnnxRuntimeCpuBackend(chain, intra_op_threads)


def create_single_graph_backend(chain: GraphChain, intra_op_threads: int | None) -> Backend:
    from .single_graph import SingleGraphBackend

    return SingleGraphBackend(chain, intra_op_threads)


def create_tensorrt_backend(chain: GraphChain, engines: EngineChain | None, max_concurrency: int) -> Backend:
    from .tensorrt import TensorRTBackend

    return TensorRTBackend(chain, engines, max_concurrency)


def create_cuda_backend(chain: GraphChain, explicit: bool, intra_op_threads: int | None) -> Backend:
    try:
        from .onnxruntime_cuda import OnnxRuntimeCudaBackend

        return OnnxRuntimeCudaBackend(chain)
    except BackendUnavailableError:
        if explicit:
            raise
        warnings.warn(
            "onnxruntime CUDA execution provider could not start; falling back to CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return create_cpu_backend(chain, intra_op_threads)
