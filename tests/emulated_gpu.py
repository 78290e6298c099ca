"""An emulated GPU stack for the GPU backends' tests and for benchmarks/gpu_check.py.

- `SoftwareCuda`: cuda-python's runtime API on host memory ('device' buffers are numpy arrays,
  streams are ints), with bounds-checked copies, so a wrong offset fails instead of corrupting memory.
- `DeviceMemory`: real device memory behind the same read/write interface, each copy waited for.
- `EmulatedTensorRT`: the slice of the tensorrt module the backend uses. Each "engine" file holds
  the bundle-relative path of the ONNX graph it stands for; what an engine computes is a
  `compute(context, stream)` made per graph file, so the same engines run onnxruntime CPU sessions
  here and, in the GPU check, torch modules on the backend's own stream. Contexts behave like
  TensorRT's where the backend relies on it: shapes outside the optimization profile are refused,
  and a context created for user-managed memory refuses to run without a large enough block.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pcee.runtime import FileEntry, GraphFile, GraphSpec, TensorRTEngines
from pcee.runtime.backends import cuda_memory, onnxruntime_cuda
from pcee.runtime.backends import tensorrt as tensorrt_backend
from pcee.runtime.backends.cuda_memory import CudaRuntime
from pcee.runtime.backends.onnxruntime_cpu import ORT_DTYPES, cpu_session_options, open_session
from pcee.runtime.graphs import BATCH, SEQUENCE, TensorSpec

SCRATCH_BYTES = 4096  # what each emulated engine says its execution context needs


# -- an emulated cudart ------------------------------------------------------------------------------
class SoftwareCuda:
    """cuda-python's runtime API on host memory; `outstanding()` shows what was never freed.

    Strict mode only lets copies touch buffers this object allocated. Non-strict mode lets device
    pointers come from elsewhere (onnxruntime's CPU OrtValues standing in for CUDA ones).
    """

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorInsufficientDriver = 35
        cudaErrorInvalidResourceHandle = 400

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    cudaStreamNonBlocking = 1
    OK = (cudaError_t.cudaSuccess,)
    INVALID = (cudaError_t.cudaErrorInvalidValue,)

    def __init__(self, strict: bool = True):
        self.strict = strict
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.streams: set[int] = set()
        self.next_stream = 1
        self.lock = threading.Lock()

    def outstanding(self) -> tuple[int, int, int]:
        return len(self.device), len(self.pinned), len(self.streams)

    # queries
    def cudaGetDeviceCount(self):
        return (*self.OK, 1)

    def cudaDriverGetVersion(self):
        return (*self.OK, 13000)

    def cudaGetDeviceProperties(self, device):
        return (*self.OK, SimpleNamespace(name=b"Software GPU".ljust(256, b"\0")))

    def cudaGetErrorName(self, error):
        return (*self.OK, error.name.encode())

    def cudaGetErrorString(self, error):
        return (*self.OK, b"emulated failure")

    # memory
    def allocate(self, table: dict, nbytes: int):
        buffer = np.zeros(nbytes, dtype=np.uint8)
        with self.lock:
            table[buffer.ctypes.data] = buffer
        return (*self.OK, buffer.ctypes.data)

    def release(self, table: dict, pointer: int):
        with self.lock:
            return self.OK if table.pop(pointer, None) is not None else self.INVALID

    def cudaMalloc(self, nbytes):
        return self.allocate(self.device, nbytes)

    def cudaFree(self, pointer):
        return self.release(self.device, pointer)

    def cudaMallocHost(self, nbytes):
        return self.allocate(self.pinned, nbytes)

    def cudaFreeHost(self, pointer):
        return self.release(self.pinned, pointer)

    def inside(self, table: dict, address: int, nbytes: int) -> bool:
        with self.lock:
            return any(
                start <= address and address + nbytes <= start + buffer.nbytes
                for start, buffer in table.items()
            )

    def view(self, address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not self.inside(self.device, address, nbytes):
            raise AssertionError(f"{nbytes} bytes at {address:#x} lie outside every device buffer")
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(address), dtype=dtype).reshape(shape)

    # what the emulated engines read and write
    def read(self, address: int, shape: tuple[int, ...], dtype, stream) -> np.ndarray:
        return self.view(address, shape, dtype).copy()

    def write(self, address: int, array: np.ndarray, stream) -> None:
        self.view(address, array.shape, array.dtype)[...] = array

    # streams
    def cudaStreamCreateWithFlags(self, flags):
        with self.lock:
            stream, self.next_stream = self.next_stream, self.next_stream + 1
            self.streams.add(stream)
        return (*self.OK, stream)

    def known_stream(self, stream) -> bool:
        return int(stream) in self.streams

    def cudaStreamSynchronize(self, stream):
        return self.OK if self.known_stream(stream) else (self.cudaError_t.cudaErrorInvalidResourceHandle,)

    def cudaStreamDestroy(self, stream):
        with self.lock:
            if int(stream) not in self.streams:
                return (self.cudaError_t.cudaErrorInvalidResourceHandle,)
            self.streams.discard(int(stream))
        return self.OK

    # copies
    def copy_allowed(self, target: int, source: int, span_target: int, span_source: int, kind) -> bool:
        device_target = kind != self.cudaMemcpyKind.cudaMemcpyDeviceToHost
        device_source = kind != self.cudaMemcpyKind.cudaMemcpyHostToDevice
        if device_target and self.strict and not self.inside(self.device, target, span_target):
            return False
        if device_source and self.strict and not self.inside(self.device, source, span_source):
            return False
        # Device-to-host copies must land in pinned memory, or they would not be asynchronous.
        return device_target or self.inside(self.pinned, target, span_target)

    def cudaMemcpyAsync(self, target, source, count, kind, stream):
        if not self.known_stream(stream) or not self.copy_allowed(target, source, count, count, kind):
            return self.INVALID
        ctypes.memmove(target, source, count)
        return self.OK

    def cudaMemcpy2DAsync(self, target, target_pitch, source, source_pitch, width, height, kind, stream):
        if width > target_pitch or width > source_pitch or not self.known_stream(stream):
            return self.INVALID
        span_target, span_source = (height - 1) * target_pitch + width, (height - 1) * source_pitch + width
        if not self.copy_allowed(target, source, span_target, span_source, kind):
            return self.INVALID
        for row in range(height):
            ctypes.memmove(target + row * target_pitch, source + row * source_pitch, width)
        return self.OK


class DeviceMemory:
    """Real device memory behind SoftwareCuda's read/write: copies on the engine call's stream, each waited for."""

    def __init__(self, cuda: CudaRuntime):
        self.cuda = cuda

    def read(self, address: int, shape: tuple[int, ...], dtype, stream) -> np.ndarray:
        array = np.empty(shape, dtype=dtype)
        self.cuda.copy_to_host(array, address, array.nbytes, stream)
        self.cuda.synchronize(stream)
        return array

    def write(self, address: int, array: np.ndarray, stream) -> None:
        self.cuda.copy_to_device(address, np.ascontiguousarray(array), stream)
        self.cuda.synchronize(stream)


# -- emulated TensorRT -------------------------------------------------------------------------------
Compute = Callable[["EmulatedContext", int], None]


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class EmulatedContext:
    def __init__(self, engine: EmulatedEngine, strategy: ExecutionContextAllocationStrategy):
        self.engine = engine
        self.user_managed = strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        self.device_memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        if not self.engine.within_profile(name, tuple(shape)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def set_device_memory(self, memory, size):
        self.device_memory = (int(memory), int(size))

    def execute_async_v3(self, stream):
        if self.user_managed and (
            self.device_memory is None or self.device_memory[1] < self.engine.device_memory_size_v2
        ):
            return False
        self.engine.compute(self, stream)
        return True


class EmulatedEngine:
    def __init__(self, spec: GraphSpec, max_batch_size: int, max_seq_len: int, compute: Compute):
        self.spec = spec
        self.compute = compute
        self.names = spec.input_names + spec.output_names
        self.dtypes = {tensor.name: np.dtype(tensor.dtype) for tensor in spec.inputs + spec.outputs}
        self.limits = {BATCH: max_batch_size, SEQUENCE: max_seq_len}
        self.device_memory_size_v2 = SCRATCH_BYTES
        self.contexts: list[EmulatedContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, profile_index):
        shape = next(tensor.shape for tensor in self.spec.inputs if tensor.name == name)
        minimum = tuple(1 if dim in self.limits else dim for dim in shape)
        maximum = tuple(self.limits.get(dim, dim) for dim in shape)
        return [minimum, maximum, maximum]

    def within_profile(self, name: str, shape: tuple[int, ...]) -> bool:
        minimum, _, maximum = self.get_tensor_profile_shape(name, 0)
        return len(shape) == len(minimum) and all(
            low <= dim <= high for low, dim, high in zip(minimum, shape, maximum)
        )

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        context = EmulatedContext(self, strategy)
        self.contexts.append(context)
        return context


class EmulatedTensorRT:
    """The slice of the tensorrt module the backend uses, over engine files that name ONNX graphs."""

    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    def __init__(
        self,
        bundle_dir: Path,
        make_compute: Callable[[Path], Compute],
        max_batch_size: int,
        max_seq_len: int,
        version: str = "10.16.0",
    ):
        self.__version__ = version
        self.bundle_dir = bundle_dir
        self.make_compute = make_compute
        self.max_batch_size, self.max_seq_len = (
            max_batch_size,
            max_seq_len,
        )  # the engines' optimization profile
        self.engines: list[EmulatedEngine] = []

    def Runtime(self, logger):
        return self

    def deserialize_cuda_engine(self, data: bytes):
        path = self.bundle_dir / data.decode()
        engine = EmulatedEngine(
            onnx_signature(path), self.max_batch_size, self.max_seq_len, self.make_compute(path)
        )
        self.engines.append(engine)
        return engine

    @staticmethod
    def nptype(dtype):
        return dtype


def onnx_signature(path: Path) -> GraphSpec:
    """The graph's inputs and outputs as the ONNX file declares them (dynamic axes by name)."""
    session = open_session(path, cpu_session_options(), ["CPUExecutionProvider"])

    def specs(arguments) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(argument.name, ORT_DTYPES[argument.type], tuple(argument.shape))
            for argument in arguments
        )

    return GraphSpec(path.stem, specs(session.get_inputs()), specs(session.get_outputs()))


def onnxruntime_compute(memory: SoftwareCuda | DeviceMemory) -> Callable[[Path], Compute]:
    """Engines that run their ONNX graph in an onnxruntime CPU session, on `memory`."""

    def make_compute(path: Path) -> Compute:
        session = open_session(path, cpu_session_options(), ["CPUExecutionProvider"])
        inputs = [(argument.name, np.dtype(ORT_DTYPES[argument.type])) for argument in session.get_inputs()]
        output_names = [argument.name for argument in session.get_outputs()]

        def compute(context: EmulatedContext, stream: int) -> None:
            feeds = {
                name: memory.read(context.addresses[name], context.shapes[name], dtype, stream)
                for name, dtype in inputs
            }
            for name, value in zip(output_names, session.run(output_names, feeds)):
                memory.write(context.addresses[name], value, stream)

        return compute

    return make_compute


def write_engine_files(
    bundle: Path, graphs: list[GraphFile], max_batch_size: int, max_seq_len: int, version: str = "10.16.0"
) -> TensorRTEngines:
    """Write an 'engine' file per graph, naming the ONNX graph it stands for; returns the manifest's tensorrt block."""
    (bundle / "trt").mkdir(exist_ok=True)
    entries = []
    for graph in graphs:
        relative = f"trt/{Path(graph.file).stem}.engine"
        (bundle / relative).write_bytes(graph.file.encode())
        entries.append(FileEntry.of(bundle, relative))
    return TensorRTEngines(
        version, "Software GPU", False, max_batch_size, max_seq_len, entries[0], entries[1:]
    )


def install_software_gpu(
    monkeypatch, bundle_dir: Path, strict: bool, max_batch_size: int, max_seq_len: int
) -> SoftwareCuda:
    """Both GPU backends on a SoftwareCuda: emulated TensorRT engines, and CPU sessions and OrtValues standing in for CUDA ones."""
    cuda = SoftwareCuda(strict)
    tensorrt = EmulatedTensorRT(bundle_dir, onnxruntime_compute(cuda), max_batch_size, max_seq_len)
    monkeypatch.setattr(cuda_memory, "import_cudart", lambda: cuda)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: tensorrt)
    monkeypatch.setattr(onnxruntime_cuda, "cuda_provider_problems", lambda: [])
    monkeypatch.setattr(
        onnxruntime_cuda,
        "open_cuda_session",
        lambda graph, options: open_session(graph.path, options, ["CPUExecutionProvider"]),
    )
    monkeypatch.setattr(onnxruntime_cuda, "ORT_DEVICE_TYPE", "cpu")
    return cuda
