"""The GPU backends (TensorRT, onnxruntime CUDA) and their shared device-memory helpers.

Three kinds of tests:
- pure planning logic (row runs, compaction plans, pools, context bookkeeping), run everywhere;
- "software GPU" runs: the real backend code drives an emulated cudart (numpy host buffers,
  bounds-checked copies) and emulated TensorRT engines (onnxruntime CPU sessions on that memory),
  so buffers, ping-pong, pinned exit slots, compaction and pooling are checked against the CPU
  backend without a GPU;
- `gpu`-marked runs of the same comparisons on a real GPU, skipped where there is none.
"""

from __future__ import annotations

import ctypes
import enum
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcee.runtime import BackendUnavailableError, EarlyExitRuntime, FileEntry, InputError, Manifest, PceeError, TensorRTEngines
from pcee.runtime.backends import cuda_memory, onnxruntime_cuda
from pcee.runtime.backends import tensorrt as tensorrt_backend
from pcee.runtime.backends.cuda_memory import Allocations, CudaRuntime, LeasePool, plan_compaction, plan_row_copies, row_extents, runs_of_true
from pcee.runtime.backends.onnxruntime_cpu import cpu_session_options, longest_unmasked, open_session
from pcee.runtime.backends.tensorrt import BoundContext
from pcee.runtime.policies import OperatingPoint

NO_GPU_REASON = "needs an NVIDIA GPU with TensorRT / onnxruntime-gpu; none here"
NUM_LAYERS = 4
MAX_BATCH_SIZE = 8
WORDS = "the a movie film story good bad great awful fun dull love hate plot actors what really quite best worst".split()


def has_cuda_gpu() -> bool:
    try:
        CudaRuntime.load()
    except BackendUnavailableError:
        return False
    return True


HAS_GPU = has_cuda_gpu()
HAS_TENSORRT = HAS_GPU and tensorrt_backend.import_tensorrt() is not None
HAS_CUDA_PROVIDER = HAS_GPU and not onnxruntime_cuda.cuda_provider_problems()
CUDA_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)]
TENSORRT_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TENSORRT, reason=NO_GPU_REASON)]
CUDA_PROVIDER_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_PROVIDER, reason=NO_GPU_REASON)]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 25)))) for _ in range(count)]


# -- an emulated cudart ------------------------------------------------------------------------------
class SoftwareCuda:
    """cuda-python's runtime API on host memory: 'device' buffers are numpy arrays, streams are ints.

    Copies are bounds-checked against the buffers this object allocated (strict mode), so a wrong
    offset fails the test instead of corrupting memory; `outstanding()` shows what was never freed.
    Non-strict mode lets device pointers come from elsewhere (onnxruntime's CPU OrtValues).
    """

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
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
            return any(start <= address and address + nbytes <= start + buffer.nbytes for start, buffer in table.items())

    def view(self, address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not self.inside(self.device, address, nbytes):
            raise AssertionError(f"{nbytes} bytes at {address:#x} lie outside every device buffer")
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(address), dtype=dtype).reshape(shape)

    # what the emulated TensorRT engines read and write
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
    """Real device memory for the emulated engines: copies on the engine call's stream, waited for."""

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


# -- emulated TensorRT: each "engine" file names the ONNX graph that an onnxruntime CPU session runs,
# reading and writing SoftwareCuda memory, or real device memory on a GPU machine without TensorRT.
ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16), "tensor(int64)": np.dtype(np.int64)}


class SoftwareContext:
    def __init__(self, engine: "SoftwareEngine"):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        engine = self.engine
        feeds = {
            arg.name: engine.memory.read(self.addresses[arg.name], self.shapes[arg.name], engine.dtypes[arg.name], stream)
            for arg in engine.session.get_inputs()
        }
        for arg, value in zip(engine.session.get_outputs(), engine.session.run(None, feeds)):
            engine.memory.write(self.addresses[arg.name], value, stream)
        return True


class SoftwareEngine:
    def __init__(self, session: ort.InferenceSession, memory: "SoftwareCuda | DeviceMemory"):
        self.session = session
        self.memory = memory
        self.dtypes = {arg.name: ORT_TYPES[arg.type] for arg in [*session.get_inputs(), *session.get_outputs()]}
        self.names = list(self.dtypes)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        return SoftwareContext(self)


class SoftwareTensorRT:
    """The slice of the tensorrt module the backend uses."""

    __version__ = "10.0.0"

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    def __init__(self, bundle_dir: Path, memory: "SoftwareCuda | DeviceMemory"):
        self.bundle_dir = bundle_dir
        self.memory = memory

    def Runtime(self, logger):
        return self

    def deserialize_cuda_engine(self, data: bytes):
        session = open_session(self.bundle_dir / data.decode(), cpu_session_options(), ["CPUExecutionProvider"])
        return SoftwareEngine(session, self.memory)

    @staticmethod
    def nptype(dtype):
        return dtype


def install_software_gpu(monkeypatch, bundle_dir: Path, strict: bool) -> SoftwareCuda:
    cuda = SoftwareCuda(strict)
    monkeypatch.setattr(cuda_memory, "import_cudart", lambda: cuda)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: SoftwareTensorRT(bundle_dir, cuda))
    # onnxruntime CUDA: CPU sessions and CPU OrtValues stand in for CUDA ones.
    monkeypatch.setattr(onnxruntime_cuda, "cuda_provider_problems", lambda: [])
    monkeypatch.setattr(onnxruntime_cuda, "open_cuda_session", lambda graph, options: open_session(graph.path, options, ["CPUExecutionProvider"]))
    monkeypatch.setattr(onnxruntime_cuda, "ORT_DEVICE_TYPE", "cpu")
    return cuda


# -- bundles -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="building a tiny bundle needs the export extras (torch)")
    from pcee.exporter.bundle import export_bundle
    from tiny_models import make_tiny_model_dir

    root = tmp_path_factory.mktemp("gpu-backends")
    return export_bundle(make_tiny_model_dir(root, num_layers=NUM_LAYERS), root / "bundle").bundle_dir


@pytest.fixture(scope="module")
def software_engine_bundle(onnx_bundle, tmp_path_factory) -> Path:
    """The ONNX bundle plus a tensorrt block whose 'engines' name the ONNX graphs they stand for."""
    bundle = tmp_path_factory.mktemp("software-engines") / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    manifest = Manifest.load(bundle)
    (bundle / "trt").mkdir()
    entries = []
    for graph in [manifest.embeddings, *manifest.layers]:
        relative = f"trt/{Path(graph.file).stem}.engine"
        (bundle / relative).write_bytes(graph.file.encode())
        entries.append(FileEntry.of(bundle, relative))
    manifest.tensorrt = TensorRTEngines(
        SoftwareTensorRT.__version__, "Software GPU", False, MAX_BATCH_SIZE, manifest.model.max_seq_len, entries[0], entries[1:],
    )
    manifest.save(bundle)
    return bundle


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory) -> Path:
    """A tiny bundle with real TensorRT engines (only built when a gpu test runs)."""
    from pcee.exporter.bundle import ExportOptions, export_bundle
    from tiny_models import make_tiny_model_dir

    root = tmp_path_factory.mktemp("gpu-engines")
    options = ExportOptions(tensorrt=True, max_batch_size=MAX_BATCH_SIZE)
    return export_bundle(make_tiny_model_dir(root, num_layers=NUM_LAYERS), root / "bundle", options).bundle_dir


BACKEND_KINDS = [
    pytest.param(("tensorrt", "software"), id="tensorrt-software"),
    pytest.param(("onnxruntime-cuda", "software"), id="onnxruntime-cuda-software"),
    # The TensorRT backend's buffers, copies and streams on a real GPU, with emulated engines (no TensorRT needed).
    pytest.param(("tensorrt", "cuda-emulated"), id="tensorrt-cuda-emulated", marks=CUDA_GPU),
    pytest.param(("tensorrt", "gpu"), id="tensorrt-gpu", marks=TENSORRT_GPU),
    pytest.param(("onnxruntime-cuda", "gpu"), id="onnxruntime-cuda-gpu", marks=CUDA_PROVIDER_GPU),
]
# TF32 matmuls (the GPU default) move outputs by ~1e-3; the software GPU runs the very same graphs.
TOLERANCE = {"software": 1e-5, "cuda-emulated": 1e-5, "gpu": 5e-3}


@pytest.fixture(params=BACKEND_KINDS)
def runtimes(request, monkeypatch):
    """(GPU-backend runtime, CPU runtime on the same bundle, device kind)."""
    backend, kind = request.param
    if kind == "software":
        bundle = request.getfixturevalue("software_engine_bundle")
        install_software_gpu(monkeypatch, bundle, strict=backend == "tensorrt")
    elif kind == "cuda-emulated":
        bundle = request.getfixturevalue("software_engine_bundle")
        memory = DeviceMemory(CudaRuntime.load())
        monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: SoftwareTensorRT(bundle, memory))
    else:
        bundle = request.getfixturevalue("gpu_bundle")
    with EarlyExitRuntime.from_bundle(bundle, backend=backend) as gpu, EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu") as cpu:
        yield gpu, cpu, kind


def assert_records_close(actual, expected, atol: float) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for name in ("logits", "entropy", "max_probability"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=atol, err_msg=name)


def partial_exit_point(runtime: EarlyExitRuntime, texts: list[str]) -> OperatingPoint:
    """PCEE with patience 2 and tau in the widest gap of the middle rows, so some rows leave after layer 2 and some stay."""
    exits = runtime.run_all_exits(runtime.tokenizer.encode_texts(texts), batch_size=MAX_BATCH_SIZE)
    deciding = np.sort(exits.entropy[:, :2].max(axis=1))
    middle = range(len(deciding) // 4, 3 * len(deciding) // 4)
    widest = max(middle, key=lambda index: deciding[index + 1] - deciding[index])
    return OperatingPoint(policy="pcee", tau=float((deciding[widest] + deciding[widest + 1]) / 2), patience=2)


# -- planning logic ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mask", "runs"),
    [
        ([True, True, False, True], [(0, 2), (3, 1)]),
        ([False, False], []),
        ([True], [(0, 1)]),
        ([False, True, True, True, False, True, True], [(1, 3), (5, 2)]),
    ],
)
def test_runs_of_true(mask, runs):
    assert runs_of_true(np.array(mask)) == runs


def test_adjacent_kept_rows_share_one_copy():
    copies = plan_row_copies(np.array([True, True, False, True, True, True]), sequence_length=10, kept_length=6, position_bytes=4)
    assert [(c.height, c.source_offset, c.target_offset) for c in copies] == [(2, 0, 0), (3, 3 * 40, 2 * 24)]
    assert all((c.width, c.source_pitch, c.target_pitch) == (24, 40, 24) for c in copies)


def test_row_extents_agree_with_the_cpu_backend():
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    bias = np.where(mask == 0, -1e9, 0.0).astype(np.float32)[:, None, None, :]
    assert row_extents(mask).tolist() == [3, 5, 1]
    for keep in ([True, False, True], [False, True, False], [True, True, True]):
        keep = np.array(keep)
        assert int(row_extents(mask)[keep].max()) == longest_unmasked(bias[keep])


def gathered(plan_copies, source: np.ndarray, target_shape: tuple, cuda: CudaRuntime) -> np.ndarray:
    target = np.zeros(target_shape, dtype=source.dtype)
    cuda.enqueue_copies(plan_copies, source.ctypes.data, target.ctypes.data, stream=0)
    return target


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=9), st.data())
def test_device_compaction_equals_cpu_compaction(lengths, data):
    """The 2D-copy plan, executed by an emulated cudaMemcpy2DAsync, gives exactly hidden[keep, :longest]."""
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths))))
    if not keep.any():
        keep[data.draw(st.integers(0, len(lengths) - 1))] = True
    sequence = max(lengths)
    mask = (np.arange(sequence)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    hidden = np.random.default_rng(len(lengths)).standard_normal((len(lengths), sequence, 3)).astype(np.float32)
    bias = np.where(mask == 0, -1e9, 0.0).astype(np.float32)[:, None, None, :]
    cuda = CudaRuntime(SoftwareCuda(strict=False))
    cuda.api.streams.add(0)

    plan = plan_compaction(keep, row_extents(mask), sequence, hidden_position_bytes=3 * 4, bias_position_bytes=4)

    longest = longest_unmasked(bias[keep])
    assert (plan.rows, plan.sequence_length) == (int(keep.sum()), longest)
    np.testing.assert_array_equal(gathered(plan.hidden_copies, hidden, (plan.rows, longest, 3), cuda), hidden[keep, :longest])
    np.testing.assert_array_equal(gathered(plan.bias_copies, bias, (plan.rows, 1, 1, longest), cuda), bias[keep][..., :longest])
    assert len(plan.hidden_copies) == len(runs_of_true(keep))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)
def test_compaction_copies_on_a_real_gpu():
    cuda = CudaRuntime.load()
    memory = Allocations(cuda)
    stream = memory.stream()
    mask = (np.arange(9)[None, :] < np.array([4, 9, 2, 7, 9, 3])[:, None]).astype(np.int64)
    hidden = np.random.default_rng(0).standard_normal((6, 9, 5)).astype(np.float32)
    keep = np.array([True, False, True, True, False, True])  # both longest rows leave: 9 -> 7 positions
    plan = plan_compaction(keep, row_extents(mask), 9, hidden_position_bytes=5 * 4, bias_position_bytes=4)
    source, target = memory.device(hidden.nbytes), memory.device(hidden.nbytes)
    result = memory.pinned((plan.rows, plan.sequence_length, 5), np.float32)
    try:
        cuda.copy_to_device(source, hidden, stream)
        cuda.enqueue_copies(plan.hidden_copies, source, target, stream)
        cuda.copy_to_host(result, target, result.nbytes, stream)
        cuda.synchronize(stream)
        np.testing.assert_array_equal(result, hidden[keep, :7])
        assert cuda.device_description().startswith("cuda:0 (")
    finally:
        memory.free_all()


def test_cuda_errors_name_the_call_and_the_error():
    cuda = CudaRuntime(SoftwareCuda())
    with pytest.raises(PceeError, match=r"cudaStreamSynchronize failed \(cudaErrorInvalidResourceHandle"):
        cuda.synchronize(12345)


def test_lease_pool_reuses_grows_and_frees_on_close():
    created, destroyed = [], []

    def create() -> int:
        created.append(len(created))
        return created[-1]

    pool = LeasePool(create, destroyed.append)
    first = pool.checkout()
    second = pool.checkout()  # the first is still out: a second caller gets a new item
    pool.give_back(first)
    assert pool.checkout() == first and created == [0, 1]
    pool.give_back(first)
    pool.close()
    assert destroyed == [first]
    pool.give_back(second)  # returned after close: destroyed, not kept
    assert destroyed == [first, second]
    with pytest.raises(PceeError, match="closed"):
        pool.checkout()


class RecordingContext:
    def __init__(self, accept: bool = True):
        self.accept = accept
        self.calls: list[tuple] = []

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, shape))
        return self.accept

    def set_tensor_address(self, name, address):
        self.calls.append(("address", name, address))
        return self.accept

    def execute_async_v3(self, stream):
        self.calls.append(("execute", stream))
        return self.accept


def bound(context: RecordingContext) -> BoundContext:
    return BoundContext(SimpleNamespace(create_execution_context=lambda: context), "layer 1 engine")


def test_shapes_and_addresses_are_set_only_when_they_change():
    context = RecordingContext()
    binding = bound(context)
    for shape, address in [((2, 5, 32), 100), ((2, 5, 32), 100), ((1, 5, 32), 100), ((1, 5, 32), 200)]:
        binding.set_shape("hidden_states", shape)
        binding.set_address("hidden_states", address)
    assert context.calls == [
        ("shape", "hidden_states", (2, 5, 32)), ("address", "hidden_states", 100),
        ("shape", "hidden_states", (1, 5, 32)), ("address", "hidden_states", 200),
    ]


def test_every_tensorrt_false_becomes_an_error():
    context = RecordingContext(accept=False)
    binding = bound(context)
    with pytest.raises(PceeError, match="optimization profile"):
        binding.set_shape("hidden_states", (99, 5, 32))
    with pytest.raises(PceeError, match="refused the device address"):
        binding.set_address("hidden_states", 100)
    with pytest.raises(PceeError, match="execute_async_v3 failed"):
        binding.execute(7)
    context.accept = True
    binding.set_shape("hidden_states", (99, 5, 32))  # a rejected shape is not remembered as set
    assert context.calls[-1] == ("shape", "hidden_states", (99, 5, 32))
    with pytest.raises(PceeError, match="could not create an execution context"):
        BoundContext(SimpleNamespace(create_execution_context=lambda: None), "embeddings engine")


# -- what a machine without the GPU stack is told ----------------------------------------------------
def missing_gpu_pieces() -> list[str]:
    if cuda_memory.import_cudart() is None:
        return ["cuda-python"]
    return [] if HAS_GPU else ["an NVIDIA GPU"]


def test_tensorrt_request_names_everything_missing(onnx_bundle, software_engine_bundle):
    expected = missing_gpu_pieces() + (["the tensorrt package"] if tensorrt_backend.import_tensorrt() is None else [])
    if not expected:
        pytest.skip("this machine has TensorRT, cuda-python and a GPU")
    with pytest.raises(BackendUnavailableError) as without_engines:
        EarlyExitRuntime.from_bundle(onnx_bundle, backend="tensorrt")
    with pytest.raises(BackendUnavailableError) as with_engines:
        EarlyExitRuntime.from_bundle(software_engine_bundle, backend="tensorrt")
    for piece in expected:
        assert piece in str(without_engines.value) and piece in str(with_engines.value)
    assert "TensorRT engines in the bundle" in str(without_engines.value)
    assert "engines" not in str(with_engines.value)


def test_onnxruntime_cuda_request_names_everything_missing(onnx_bundle):
    expected = missing_gpu_pieces() + (["CUDAExecutionProvider"] if onnxruntime_cuda.cuda_provider_problems() else [])
    if not expected:
        pytest.skip("this machine has onnxruntime-gpu, cuda-python and a GPU")
    with pytest.raises(BackendUnavailableError) as raised:
        EarlyExitRuntime.from_bundle(onnx_bundle, backend="onnxruntime-cuda")
    for piece in expected:
        assert piece in str(raised.value)


# -- the backends against the CPU backend (software GPU here, real GPU where there is one) ----------
def test_device_names_the_gpu(runtimes):
    gpu, _, kind = runtimes
    assert gpu.device.startswith("cuda:0 (") and (kind != "software" or gpu.device == "cuda:0 (Software GPU)")


def test_layers_and_device_compaction_match_cpu(runtimes):
    gpu, cpu, kind = runtimes
    batch = cpu.tokenizer.encode_texts(sentences(MAX_BATCH_SIZE, seed=1))
    longest_row = int(np.argmax(batch.attention_mask.sum(axis=1)))
    first_keep = np.ones(MAX_BATCH_SIZE, dtype=bool)
    first_keep[[longest_row, (longest_row + 3) % MAX_BATCH_SIZE]] = False  # dropping the longest row trims the sequence
    gpu_state, cpu_state = gpu.backend.begin(batch), cpu.backend.begin(batch)
    steps = [(0, 2), first_keep, (2, 1), np.array([True, False, True, True, False, True]), (3, 1)]
    for step in steps:
        if isinstance(step, tuple):
            assert_records_close(gpu.backend.run_layers(gpu_state, *step), cpu.backend.run_layers(cpu_state, *step), TOLERANCE[kind])
        else:
            gpu_state, cpu_state = gpu.backend.compact(gpu_state, step), cpu.backend.compact(cpu_state, step)
    assert cpu_state.hidden.shape[1] < batch.input_ids.shape[1]  # the plan did trim the sequence


def test_predictions_match_cpu(runtimes):
    gpu, cpu, kind = runtimes
    texts = sentences(24, seed=2)
    point = partial_exit_point(cpu, texts)
    expected = cpu.predict(texts, operating_point=point, batch_size=MAX_BATCH_SIZE)
    actual = gpu.predict(texts, operating_point=point, batch_size=MAX_BATCH_SIZE)
    exit_layers = [row.exit_layer for row in expected.predictions]
    assert 2 in exit_layers and max(exit_layers) > 2  # some rows left early, the others were compacted and ran on
    assert [row.exit_layer for row in actual.predictions] == exit_layers
    np.testing.assert_allclose(
        np.stack([row.probabilities for row in actual.predictions]),
        np.stack([row.probabilities for row in expected.predictions]), atol=TOLERANCE[kind],
    )
    all_exits = gpu.run_all_exits(gpu.tokenizer.encode_texts(texts), batch_size=MAX_BATCH_SIZE)
    np.testing.assert_allclose(all_exits.logits, cpu.run_all_exits(cpu.tokenizer.encode_texts(texts)).logits, atol=TOLERANCE[kind])


def test_concurrent_callers_get_their_own_results(runtimes):
    gpu, cpu, _ = runtimes
    texts = sentences(16, seed=3)
    point = partial_exit_point(cpu, texts)
    workloads = [texts[start:] + texts[:start] for start in range(0, 16, 4)]
    sequential = [gpu.predict(work, operating_point=point, batch_size=4) for work in workloads]
    results: dict[int, object] = {}

    def serve(index: int) -> None:
        for _ in range(3):
            results[index] = gpu.predict(workloads[index], operating_point=point, batch_size=4)

    threads = [threading.Thread(target=serve, args=(index,)) for index in range(len(workloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, expected in enumerate(sequential):
        assert [row.exit_layer for row in results[index].predictions] == [row.exit_layer for row in expected.predictions]
        for got, want in zip(results[index].predictions, expected.predictions):
            np.testing.assert_array_equal(got.probabilities, want.probabilities)


# -- TensorRT specifics ------------------------------------------------------------------------------
def test_tensorrt_refuses_batches_beyond_the_engine_profile(monkeypatch, software_engine_bundle):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    with EarlyExitRuntime.from_bundle(software_engine_bundle, backend="tensorrt") as runtime:
        with pytest.raises(InputError, match=f"max_batch_size {MAX_BATCH_SIZE}; predict with batch_size <= {MAX_BATCH_SIZE}"):
            runtime.predict(sentences(MAX_BATCH_SIZE + 1), batch_size=MAX_BATCH_SIZE + 1)


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime-cuda"])
def test_close_frees_everything_the_backend_created(monkeypatch, software_engine_bundle, backend):
    cuda = install_software_gpu(monkeypatch, software_engine_bundle, strict=backend == "tensorrt")
    runtime = EarlyExitRuntime.from_bundle(software_engine_bundle, backend=backend)
    texts = sentences(12, seed=4)
    runtime.predict(texts, operating_point=partial_exit_point(runtime, texts), batch_size=4)
    assert cuda.outstanding() != (0, 0, 0)
    runtime.close()
    assert cuda.outstanding() == (0, 0, 0)
    if backend == "tensorrt":
        with pytest.raises(PceeError, match="closed"):
            runtime.predict(texts, batch_size=4)
