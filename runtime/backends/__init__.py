"""Backend selection: the names users pass, and what 'auto' picks on this machine.

A backend is built from what it runs: the chain of graphs and, for TensorRT, the engines.
"""

from __future__ import annotations

import warnings

from ..errors import BackendUnavailableError, InputError
from ..graphs import EngineChain, GraphChain
from .base import Backend

BACKEND_NAMES = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")


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
    name: str, chain: GraphChain, engines: EngineChain | None = None, intra_op_threads: int | None = None
) -> Backend:
    """The backend `name` over `chain` (and `engines` for TensorRT); 'auto' picks the best that runs here."""
    if name not in BACKEND_NAMES:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        if engines is not None and tensorrt_available():
            try:
                return create_tensorrt_backend(chain, engines)
            except BackendUnavailableError as error:
                warnings.warn(f"TensorRT engines cannot run here ({error}); using onnxruntime", RuntimeWarning, stacklevel=2)
        name = "onnxruntime"
    if name == "tensorrt":
        return create_tensorrt_backend(chain, engines)
    if name == "onnxruntime-cuda" or (name == "onnxruntime" and cuda_provider_available()):
        return create_cuda_backend(chain, explicit=name == "onnxruntime-cuda", intra_op_threads=intra_op_threads)
    return create_cpu_backend(chain, intra_op_threads)


def create_cpu_backend(chain: GraphChain, intra_op_threads: int | None) -> Backend:
    from .onnxruntime_cpu import OnnxRuntimeCpuBackend

    return OnnxRuntimeCpuBackend(chain, intra_op_threads)


def create_tensorrt_backend(chain: GraphChain, engines: EngineChain | None) -> Backend:
    from .tensorrt import TensorRTBackend

    return TensorRTBackend(chain, engines)


def create_cuda_backend(chain: GraphChain, explicit: bool, intra_op_threads: int | None) -> Backend:
    try:
        from .onnxruntime_cuda import OnnxRuntimeCudaBackend

        return OnnxRuntimeCudaBackend(chain)
    except BackendUnavailableError:
        if explicit:
            raise
        warnings.warn("onnxruntime CUDA execution provider could not start; falling back to CPU", RuntimeWarning, stacklevel=3)
        return create_cpu_backend(chain, intra_op_threads)
