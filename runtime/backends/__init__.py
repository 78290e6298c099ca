"""Backend selection: the names users pass, and what 'auto' picks on this machine."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import BackendUnavailableError, InputError
from ..manifest import Manifest
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


def create_backend(name: str, manifest: Manifest, bundle_dir: Path, intra_op_threads: int | None = None) -> Backend:
    if name not in BACKEND_NAMES:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        if pick_automatically(manifest) == "tensorrt":
            try:
                return create_tensorrt_backend(manifest, bundle_dir)
            except BackendUnavailableError as error:
                warnings.warn(f"TensorRT engines cannot run here ({error}); using onnxruntime", RuntimeWarning, stacklevel=2)
        name = "onnxruntime"
    if name == "tensorrt":
        return create_tensorrt_backend(manifest, bundle_dir)
    if name == "onnxruntime-cuda" or (name == "onnxruntime" and cuda_provider_available()):
        return create_cuda_backend(manifest, bundle_dir, explicit=name == "onnxruntime-cuda")
    from .onnxruntime_cpu import OnnxRuntimeCpuBackend

    return OnnxRuntimeCpuBackend(manifest, bundle_dir, intra_op_threads)


def create_tensorrt_backend(manifest: Manifest, bundle_dir: Path) -> Backend:
    from .tensorrt import TensorRTBackend

    return TensorRTBackend(manifest, bundle_dir)


def pick_automatically(manifest: Manifest) -> str:
    if manifest.tensorrt and tensorrt_available():
        return "tensorrt"
    return "onnxruntime"


def create_cuda_backend(manifest: Manifest, bundle_dir: Path, explicit: bool) -> Backend:
    try:
        from .onnxruntime_cuda import OnnxRuntimeCudaBackend

        return OnnxRuntimeCudaBackend(manifest, bundle_dir)
    except BackendUnavailableError:
        if explicit:
            raise
        warnings.warn("onnxruntime CUDA execution provider could not start; falling back to CPU", RuntimeWarning, stacklevel=3)
        from .onnxruntime_cpu import OnnxRuntimeCpuBackend

        return OnnxRuntimeCpuBackend(manifest, bundle_dir)
