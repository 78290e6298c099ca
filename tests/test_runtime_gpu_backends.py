"""The GPU backends (TensorRT, onnxruntime CUDA) and their shared device-memory helpers.

Three kinds of tests:
- pure planning logic (row runs, compaction plans, pools, context bookkeeping), run everywhere;
- "software GPU" runs (tests/emulated_gpu.py): the real backend code drives an emulated cudart
  (numpy host buffers, bounds-checked copies) and emulated TensorRT engines (onnxruntime CPU
  sessions on that memory), so buffers, ping-pong, pinned exit slots, compaction, pooling, chunk
  limits and the GPU check's own checks are run against the CPU backend without a GPU;
- `gpu`-marked runs of the same comparisons on a real GPU, skipped where there is none.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import emulated_gpu
import numpy as np
import pytest
from emulated_gpu import DeviceMemory, EmulatedTensorRT, SoftwareCuda, onnxruntime_compute, write_engine_files
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pcee.benchmarks import gpu_check
from pcee.runtime import (
    BackendUnavailableError,
    BundleTokenizer,
    EarlyExitRuntime,
    InputError,
    Manifest,
    PceeError,
    record_every_exit,
)
from pcee.runtime import backends as backend_selection
from pcee.runtime.backends import cuda_memory, onnxruntime_cuda
from pcee.runtime.backends import tensorrt as tensorrt_backend
from pcee.runtime.backends.cuda_memory import (
    Allocations,
    CudaRuntime,
    LeasePool,
    plan_compaction,
    plan_row_copies,
    row_extents,
    runs_of_true,
)
from pcee.runtime.backends.onnxruntime_cpu import cpu_session_options, longest_unmasked, open_session
from pcee.runtime.backends.tensorrt import BoundContext
from pcee.runtime.policies import OperatingPoint

USER_MANAGED = EmulatedTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED

NO_GPU_REASON = "needs an NVIDIA GPU with TensorRT / onnxruntime-gpu; none here"
NUM_LAYERS = 4
MAX_BATCH_SIZE = 8
MAX_SEQ_LEN = 64  # the tiny models' max_seq_len, which the emulated engines' profile covers
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


def install_software_gpu(
    monkeypatch, bundle_dir: Path, strict: bool, max_batch_size: int = MAX_BATCH_SIZE
) -> SoftwareCuda:
    return emulated_gpu.install_software_gpu(monkeypatch, bundle_dir, strict, max_batch_size, MAX_SEQ_LEN)


# -- bundles -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_bundle(tiny_bundles) -> Path:
    return tiny_bundles.bundle(num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def software_engine_bundle(onnx_bundle, tmp_path_factory) -> Path:
    """The ONNX bundle plus a tensorrt block whose 'engines' name the ONNX graphs they stand for."""
    bundle = tmp_path_factory.mktemp("software-engines") / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    manifest = Manifest.load(bundle)
    manifest.tensorrt = write_engine_files(
        bundle, [manifest.embeddings, *manifest.layers], MAX_BATCH_SIZE, MAX_SEQ_LEN
    )
    manifest.save(bundle)
    return bundle


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory) -> Path:
    """A tiny bundle with real TensorRT engines (only built when a gpu test runs)."""
    from tiny_models import make_tiny_model_dir

    from pcee.exporter.bundle import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("gpu-engines")
    options = ExportOptions(tensorrt=True, max_batch_size=MAX_BATCH_SIZE)
    return export_bundle(
        make_tiny_model_dir(root, num_layers=NUM_LAYERS), root / "bundle", options
    ).bundle_dir


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
        tensorrt = EmulatedTensorRT(
            bundle, onnxruntime_compute(DeviceMemory(CudaRuntime.load())), MAX_BATCH_SIZE, MAX_SEQ_LEN
        )
        monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: tensorrt)
    else:
        bundle = request.getfixturevalue("gpu_bundle")
    with (
        EarlyExitRuntime.from_bundle(bundle, backend=backend) as gpu,
        EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu") as cpu,
    ):
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
    copies = plan_row_copies(
        np.array([True, True, False, True, True, True]), sequence_length=10, kept_length=6, position_bytes=4
    )
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
    hidden = (
        np.random.default_rng(len(lengths)).standard_normal((len(lengths), sequence, 3)).astype(np.float32)
    )
    bias = np.where(mask == 0, -1e9, 0.0).astype(np.float32)[:, None, None, :]
    cuda = CudaRuntime(SoftwareCuda(strict=False))
    cuda.api.streams.add(0)

    plan = plan_compaction(
        keep, row_extents(mask), sequence, hidden_position_bytes=3 * 4, bias_position_bytes=4
    )

    longest = longest_unmasked(bias[keep])
    assert (plan.rows, plan.sequence_length) == (int(keep.sum()), longest)
    np.testing.assert_array_equal(
        gathered(plan.hidden_copies, hidden, (plan.rows, longest, 3), cuda), hidden[keep, :longest]
    )
    np.testing.assert_array_equal(
        gathered(plan.bias_copies, bias, (plan.rows, 1, 1, longest), cuda), bias[keep][..., :longest]
    )
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


def test_lease_pool_waits_past_its_limit_and_wakes_on_close():
    pool = LeasePool(object, lambda item: None, limit=1)
    first = pool.checkout()
    outcome: list = []

    def wait_for_an_item() -> None:
        try:
            outcome.append(pool.checkout())
        except PceeError as error:
            outcome.append(error)

    waiting = threading.Thread(target=wait_for_an_item)
    waiting.start()
    waiting.join(timeout=0.3)
    assert waiting.is_alive()
    pool.give_back(first)
    waiting.join(timeout=10)
    assert outcome == [first]
    second_wait = threading.Thread(target=wait_for_an_item)
    second_wait.start()
    second_wait.join(timeout=0.3)
    pool.close()
    second_wait.join(timeout=10)
    assert isinstance(outcome[-1], PceeError) and "closed" in str(outcome[-1])


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
    return BoundContext(
        SimpleNamespace(create_execution_context=lambda strategy: context), "layer 1 engine", USER_MANAGED
    )


def test_shapes_and_addresses_are_set_only_when_they_change():
    context = RecordingContext()
    binding = bound(context)
    for shape, address in [((2, 5, 32), 100), ((2, 5, 32), 100), ((1, 5, 32), 100), ((1, 5, 32), 200)]:
        binding.set_shape("hidden_states", shape)
        binding.set_address("hidden_states", address)
    assert context.calls == [
        ("shape", "hidden_states", (2, 5, 32)),
        ("address", "hidden_states", 100),
        ("shape", "hidden_states", (1, 5, 32)),
        ("address", "hidden_states", 200),
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
        BoundContext(
            SimpleNamespace(create_execution_context=lambda strategy: None), "embeddings engine", USER_MANAGED
        )


# -- installing the GPU stack: dependency metadata and what a broken install is told ---------------
REPO = Path(__file__).resolve().parents[1]


def declared_requirements() -> dict[str, list[Requirement]]:
    """pyproject's dependencies: 'core' and one entry per extra."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {name: [Requirement(line) for line in lines] for name, lines in groups.items()}


def gpu_requirement(name: str) -> Requirement:
    return next(requirement for requirement in declared_requirements()["gpu"] if requirement.name == name)


def test_no_extra_installs_onnxruntime_gpu_beside_the_core_onnxruntime():
    """Both wheels write the `onnxruntime` module; pcee[gpu] must not install the second (docs/GPU.md swaps them)."""
    groups = declared_requirements()
    assert "onnxruntime" in {requirement.name for requirement in groups["core"]}
    assert all(requirement.name != "onnxruntime-gpu" for lines in groups.values() for requirement in lines)


def test_tensorrt_is_one_cuda_build_of_the_majors_the_runtime_supports():
    requirement = gpu_requirement("tensorrt-cu12")
    for version, supported in [
        ("9.3.0", False),
        ("10.0.1", False),
        ("10.1.0", True),
        ("10.16.1.11", True),
        ("11.4.0.106", True),
        ("12.0.0", False),
    ]:
        assert (version in requirement.specifier) == supported, version
        assert (backend_selection.tensorrt_version_problem(version) is None) == supported, version


def test_cuda_python_is_pinned_to_the_cuda_major_of_the_tensorrt_build():
    requirement = gpu_requirement("cuda-python")
    assert str(requirement.specifier) == str(SpecifierSet(cuda_memory.CUDA_PYTHON_PINS[12]))
    assert "12.9.0" in requirement.specifier and "13.0.0" not in requirement.specifier


def fake_distributions(monkeypatch, **versions: str) -> None:
    """importlib.metadata sees exactly these distributions (keyword names with _ for -)."""

    def version(name: str) -> str:
        try:
            return versions[name.replace("-", "_")]
        except KeyError:
            raise importlib.metadata.PackageNotFoundError(name) from None

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.parametrize(
    ("installed", "fix"),
    [
        (
            {"onnxruntime": "1.31.1", "onnxruntime_gpu": "1.31.1"},
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1",
        ),
        ({"onnxruntime_gpu": "1.31.1"}, "pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1"),
        ({"onnxruntime": "1.31.1"}, "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"),
    ],
    ids=["both-wheels", "gpu-wheel-overwritten", "cpu-wheel-only"],
)
def test_a_missing_cuda_provider_names_the_wheel_fix(monkeypatch, installed, fix):
    fake_distributions(monkeypatch, **installed)
    monkeypatch.setattr(onnxruntime_cuda.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    (problem,) = onnxruntime_cuda.cuda_provider_problems()
    assert fix in problem and "docs/GPU.md" in problem


def test_auto_warns_when_the_gpu_wheel_lost_its_cuda_provider(monkeypatch, onnx_bundle):
    fake_distributions(monkeypatch, onnxruntime="1.31.1", onnxruntime_gpu="1.31.1")
    monkeypatch.setattr(onnxruntime_cuda.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.warns(
        RuntimeWarning, match="serving on the CPU.*pip uninstall -y onnxruntime onnxruntime-gpu"
    ):
        runtime = EarlyExitRuntime.from_bundle(onnx_bundle, backend="auto")
    assert runtime.device == "cpu"
    runtime.close()


def test_a_cpu_only_install_loads_auto_without_a_warning(monkeypatch, onnx_bundle):
    fake_distributions(monkeypatch, onnxruntime="1.31.1")
    monkeypatch.setattr(onnxruntime_cuda.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EarlyExitRuntime.from_bundle(onnx_bundle, backend="auto").close()


def test_a_driver_too_old_for_cuda_python_is_told_the_pin(monkeypatch):
    cuda = SoftwareCuda()
    monkeypatch.setattr(
        cuda, "cudaGetDeviceCount", lambda: (SoftwareCuda.cudaError_t.cudaErrorInsufficientDriver, 0)
    )
    monkeypatch.setattr(cuda, "cudaDriverGetVersion", lambda: (*SoftwareCuda.OK, 12040))
    monkeypatch.setattr(cuda_memory, "import_cudart", lambda: cuda)
    fake_distributions(monkeypatch, cuda_python="13.0.1", tensorrt_cu12="10.16.1.11")
    with pytest.raises(BackendUnavailableError) as raised:
        CudaRuntime.load()
    message = str(raised.value)
    assert (
        "cudaErrorInsufficientDriver" in message
        and "cuda-python 13.0.1 needs a driver for CUDA 13" in message
    )
    assert "this driver supports CUDA 12.4" in message
    assert (
        "the CUDA major of the TensorRT build (tensorrt-cu12): pip install 'cuda-python>=12.6,<13'" in message
    )


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "10.0.1", "12.0.0"])
def test_the_runtime_refuses_tensorrt_outside_the_supported_versions(
    monkeypatch, software_engine_bundle, version
):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    emulated = tensorrt_backend.import_tensorrt()
    emulated.__version__ = version
    with pytest.raises(
        BackendUnavailableError, match=rf"TensorRT 10.1 or newer, below 12 \(found {version}\)"
    ):
        EarlyExitRuntime.from_bundle(software_engine_bundle, backend="tensorrt")


# -- what a machine without the GPU stack is told ----------------------------------------------------
def missing_gpu_pieces() -> list[str]:
    if cuda_memory.import_cudart() is None:
        return ["cuda-python"]
    return [] if HAS_GPU else ["an NVIDIA GPU"]


def test_tensorrt_request_names_everything_missing(onnx_bundle, software_engine_bundle):
    expected = missing_gpu_pieces() + (
        ["the tensorrt package"] if tensorrt_backend.import_tensorrt() is None else []
    )
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
    expected = missing_gpu_pieces() + (
        ["CUDAExecutionProvider"] if onnxruntime_cuda.cuda_provider_problems() else []
    )
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
    first_keep[[longest_row, (longest_row + 3) % MAX_BATCH_SIZE]] = (
        False  # dropping the longest row trims the sequence
    )
    gpu_state, cpu_state = gpu.backend.begin(batch), cpu.backend.begin(batch)
    steps = [(0, 2), first_keep, (2, 1), np.array([True, False, True, True, False, True]), (3, 1)]
    for step in steps:
        if isinstance(step, tuple):
            assert_records_close(
                gpu.backend.run_layers(gpu_state, *step),
                cpu.backend.run_layers(cpu_state, *step),
                TOLERANCE[kind],
            )
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
    assert (
        2 in exit_layers and max(exit_layers) > 2
    )  # some rows left early, the others were compacted and ran on
    assert [row.exit_layer for row in actual.predictions] == exit_layers
    np.testing.assert_allclose(
        np.stack([row.probabilities for row in actual.predictions]),
        np.stack([row.probabilities for row in expected.predictions]),
        atol=TOLERANCE[kind],
    )
    all_exits = gpu.run_all_exits(gpu.tokenizer.encode_texts(texts), batch_size=MAX_BATCH_SIZE)
    np.testing.assert_allclose(
        all_exits.logits, cpu.run_all_exits(cpu.tokenizer.encode_texts(texts)).logits, atol=TOLERANCE[kind]
    )


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
        assert [row.exit_layer for row in results[index].predictions] == [
            row.exit_layer for row in expected.predictions
        ]
        for got, want in zip(results[index].predictions, expected.predictions):
            np.testing.assert_array_equal(got.probabilities, want.probabilities)


# -- TensorRT specifics ------------------------------------------------------------------------------
def test_a_batch_beyond_the_engine_profile_is_refused_by_the_backend(monkeypatch, software_engine_bundle):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    with EarlyExitRuntime.from_bundle(software_engine_bundle, backend="tensorrt") as runtime:
        batch = runtime.tokenizer.encode_texts(sentences(MAX_BATCH_SIZE + 1))
        with pytest.raises(
            InputError, match=f"exceeds the TensorRT engines' max_batch_size {MAX_BATCH_SIZE}"
        ):
            runtime.backend.begin(batch)


@pytest.mark.parametrize("engine_rows", [3, MAX_BATCH_SIZE])
def test_default_chunks_fit_the_engines_own_batch_limit(monkeypatch, software_engine_bundle, engine_rows):
    """The limit is read from the engines' profiles (here 3 rows where the manifest says 8), not only the manifest."""
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True, max_batch_size=engine_rows)
    texts = sentences(20, seed=5)
    with (
        EarlyExitRuntime.from_bundle(software_engine_bundle, backend="tensorrt") as gpu,
        EarlyExitRuntime.from_bundle(software_engine_bundle, backend="onnxruntime-cpu") as cpu,
    ):
        assert gpu.backend.max_rows == engine_rows and cpu.backend.max_rows is None
        point = partial_exit_point(cpu, texts)
        actual, expected = (
            gpu.predict(texts, operating_point=point),
            cpu.predict(texts, operating_point=point),
        )
        assert [row.exit_layer for row in actual.predictions] == [
            row.exit_layer for row in expected.predictions
        ]
        recorded = gpu.run_all_exits(gpu.tokenizer.encode_texts(texts))
        np.testing.assert_allclose(
            recorded.logits, cpu.run_all_exits(cpu.tokenizer.encode_texts(texts)).logits, atol=1e-5
        )


def tensorrt_backend_over(bundle: Path, **options) -> tensorrt_backend.TensorRTBackend:
    manifest = Manifest.load(bundle)
    return tensorrt_backend.TensorRTBackend(
        manifest.graph_chain(bundle), manifest.engine_chain(bundle), **options
    )


def test_callers_past_the_context_cap_wait_for_a_set(monkeypatch, software_engine_bundle):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    tensorrt = tensorrt_backend.import_tensorrt()
    backend = tensorrt_backend_over(software_engine_bundle, max_concurrency=2)
    batch = BundleTokenizer(software_engine_bundle / "tokenizer/tokenizer.json", MAX_SEQ_LEN).encode_texts(
        sentences(3)
    )
    held = [backend.begin(batch), backend.begin(batch)]
    third: list = []
    waiting = threading.Thread(target=lambda: third.append(backend.begin(batch)))
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive() and not third  # past the cap: the third caller waits
    backend.finish(held.pop())
    waiting.join(timeout=10)
    assert not waiting.is_alive() and third[0].contexts is not None
    embeddings_engine = tensorrt.engines[0]
    assert len(embeddings_engine.contexts) == 2  # no set beyond the cap was ever made
    for state in (*held, *third):
        backend.finish(state)
    backend.close()


def test_a_burst_of_callers_never_makes_more_sets_than_the_cap(monkeypatch, software_engine_bundle):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    tensorrt = tensorrt_backend.import_tensorrt()
    with EarlyExitRuntime.from_bundle(software_engine_bundle, backend="onnxruntime-cpu") as cpu:
        texts = sentences(12, seed=6)
        expected = cpu.run_all_exits(cpu.tokenizer.encode_texts(texts)).logits
        backend = tensorrt_backend_over(software_engine_bundle, max_concurrency=2)
        results: list = []

        def serve() -> None:
            results.append(record_every_exit(backend, cpu.tokenizer.encode_texts(texts), batch_size=4).logits)

        threads = [threading.Thread(target=serve) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        backend.close()
    assert len(results) == 8 and all(np.allclose(result, expected, atol=1e-5) for result in results)
    assert len(tensorrt.engines[0].contexts) <= 2


def test_a_context_set_shares_one_scratch_block(monkeypatch, software_engine_bundle):
    """Each context is created for user-managed memory; a set's contexts all get the same block, big enough for each."""
    cuda = install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    tensorrt = tensorrt_backend.import_tensorrt()
    backend = tensorrt_backend_over(software_engine_bundle)
    contexts = [engine.contexts[0] for engine in tensorrt.engines]
    assert all(context.user_managed for context in contexts)
    blocks = {context.device_memory for context in contexts}
    assert len(blocks) == 1
    pointer, size = blocks.pop()
    assert size >= max(engine.device_memory_size_v2 for engine in tensorrt.engines) and cuda.inside(
        cuda.device, pointer, size
    )
    backend.close()


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_concurrency_must_be_a_positive_integer(monkeypatch, software_engine_bundle, value):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    with pytest.raises(InputError, match="max_concurrency"):
        tensorrt_backend_over(software_engine_bundle, max_concurrency=value)


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


# -- benchmarks/gpu_check.py's checks, on the software GPU ------------------------------------------------
def test_the_gpu_checks_pass_on_the_software_gpu(monkeypatch, software_engine_bundle):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    texts = gpu_check.sentences(24, seed=0)
    with EarlyExitRuntime.from_bundle(software_engine_bundle, backend="tensorrt") as gpu:
        result = gpu_check.compare_with_cpu(gpu, software_engine_bundle, texts, 1e-5, tensorrt_like=True)
    assert result["passed"], result
    assert result["clamp"] == {
        "max_rows": MAX_BATCH_SIZE,
        "exit_layer_agreement": 1.0,
        "backend_refuses_more_rows": True,
    }
    syncs = result["syncs"]["by_patience"]
    assert syncs[1] == {"syncs_per_request": [NUM_LAYERS] * 3, "expected_at_most": NUM_LAYERS}
    assert syncs[2]["syncs_per_request"] == [2, 2, 2] and syncs[NUM_LAYERS]["syncs_per_request"] == [1, 1, 1]


def test_the_sync_count_catches_a_second_sync_per_span(monkeypatch, software_engine_bundle):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    exit_records = tensorrt_backend.ContextSet.exit_records

    def synchronize_again(self, count, rows):
        self.synchronize()
        return exit_records(self, count, rows)

    monkeypatch.setattr(tensorrt_backend.ContextSet, "exit_records", synchronize_again)
    with EarlyExitRuntime.from_bundle(software_engine_bundle, backend="tensorrt") as gpu:
        result = gpu_check.sync_check(gpu, gpu_check.sentences(8, seed=1))
    assert not result["passed"] and result["by_patience"][2]["syncs_per_request"] == [4, 4, 4]


def test_from_bundle_passes_the_context_cap_to_the_tensorrt_backend(monkeypatch, software_engine_bundle):
    install_software_gpu(monkeypatch, software_engine_bundle, strict=True)
    with EarlyExitRuntime.from_bundle(
        software_engine_bundle, backend="tensorrt", max_concurrency=2
    ) as runtime:
        assert runtime.backend.pool._limit == 2
