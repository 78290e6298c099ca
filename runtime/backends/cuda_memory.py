"""Device-memory helpers shared by the GPU backends (TensorRT, onnxruntime CUDA).

cuda-python is imported lazily, only when a GPU backend is created: the runtime must import
without it. Every cudart call goes through `CudaRuntime.call`, which checks the returned
`cudaError_t` and raises `PceeError` naming the call and the CUDA error.

Compaction is planned here in pure Python (`plan_compaction`), so both backends gather the
kept rows the same way and the planning is testable without a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from ..errors import BackendError, BackendUnavailableError

# CUDA_VISIBLE_DEVICES chooses which physical GPU this is.
DEVICE_INDEX = 0
# cuda-python for each CUDA major a TensorRT wheel is built for (tensorrt-cu12, tensorrt-cu13): a newer
# major needs a newer driver, and 12.6 is the first 12.x with the cuda.bindings module.
CUDA_PYTHON_PINS = {12: ">=12.6,<13", 13: ">=13.0,<14"}
CUDA_PYTHON_HINT = (
    "cuda-python 12.6 or newer, of the CUDA major of your TensorRT build and driver "
    f"(pip install 'pcee[gpu]' installs cuda-python{CUDA_PYTHON_PINS[12]}, for CUDA 12)"
)

Item = TypeVar("Item")


# -- cudart with checked errors -----------------------------------------------------------------------
def import_cudart():
    """cuda-python's runtime module, or None when cuda-python (12.6 or newer) is not installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    return cudart


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def major_of(version: str) -> int:
    return int(version.split(".", 1)[0])


def tensorrt_wheel() -> tuple[str, int] | None:
    """The installed TensorRT wheel and the CUDA major it is built for, e.g. ('tensorrt-cu12', 12)."""
    for major in CUDA_PYTHON_PINS:
        if installed_version(f"tensorrt-cu{major}") is not None:
            return f"tensorrt-cu{major}", major
    return None


class CudaRuntime:
    """The few cudart calls the GPU backends use; every error becomes a PceeError."""

    def __init__(self, cudart):
        self.api = cudart

    @classmethod
    def load(cls) -> CudaRuntime:
        """cudart on a machine with a visible GPU; BackendUnavailableError saying which of the two is missing."""
        cudart = import_cudart()
        if cudart is None:
            raise BackendUnavailableError(CUDA_PYTHON_HINT)
        runtime = cls(cudart)
        try:
            error, count = cudart.cudaGetDeviceCount()
        except (RuntimeError, OSError) as failure:  # older cuda-python raises when libcuda cannot be loaded
            raise BackendUnavailableError(f"an NVIDIA GPU driver ({failure})") from None
        if error != cudart.cudaError_t.cudaSuccess:
            raise BackendUnavailableError(
                f"an NVIDIA GPU (cudaGetDeviceCount: {runtime.describe(error)}){runtime.driver_hint()}"
            )
        if not count:
            raise BackendUnavailableError("an NVIDIA GPU (cudaGetDeviceCount: 0 devices)")
        return runtime

    def driver_cuda_version(self) -> tuple[int, int] | None:
        """The newest CUDA version the installed driver supports, e.g. (12, 4); None when it cannot say."""
        error, version = self.api.cudaDriverGetVersion()
        if error != self.api.cudaError_t.cudaSuccess or not version:
            return None
        return version // 1000, version % 1000 // 10

    def driver_hint(self) -> str:
        """When cuda-python is for a newer CUDA major than the driver's: what to install instead."""
        bindings = installed_version("cuda-python") or installed_version("cuda-bindings")
        driver = self.driver_cuda_version()
        if bindings is None or driver is None or major_of(bindings) <= driver[0]:
            return ""
        hint = f"; cuda-python {bindings} needs a driver for CUDA {major_of(bindings)}, and this driver supports CUDA {driver[0]}.{driver[1]}"
        wheel = tensorrt_wheel()
        if wheel is not None:
            name, major = wheel
            hint += f". Install cuda-python for the CUDA major of the TensorRT build ({name}): pip install 'cuda-python{CUDA_PYTHON_PINS[major]}'"
            return hint if major <= driver[0] else f"{hint}, and an NVIDIA driver for CUDA {major}"
        if driver[0] in CUDA_PYTHON_PINS:
            return f"{hint}. Install cuda-python for this driver: pip install 'cuda-python{CUDA_PYTHON_PINS[driver[0]]}'"
        return f"{hint}. Update the NVIDIA driver to one for CUDA {min(CUDA_PYTHON_PINS)} or newer"

    def describe(self, error) -> str:
        name = self.api.cudaGetErrorName(error)[1]
        message = self.api.cudaGetErrorString(error)[1]
        return f"{name.decode()}: {message.decode()}"

    def call(self, function: str, *arguments):
        """Call cudart `function`; return its value (None, one value, or a tuple) after checking the error."""
        error, *values = getattr(self.api, function)(*arguments)
        if error != self.api.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA call {function} failed ({self.describe(error)})")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device_description(self) -> str:
        properties = self.call("cudaGetDeviceProperties", DEVICE_INDEX)
        name = bytes(properties.name).split(b"\0", 1)[0].decode(errors="replace")
        return f"cuda:{DEVICE_INDEX} ({name})"

    # -- streams -----------------------------------------------------------------------------------
    def create_stream(self):
        # Non-blocking: the stream must not serialise with the legacy default stream other libraries use.
        return self.call("cudaStreamCreateWithFlags", self.api.cudaStreamNonBlocking)

    def destroy_stream(self, stream) -> None:
        self.call("cudaStreamDestroy", stream)

    def synchronize(self, stream) -> None:
        self.call("cudaStreamSynchronize", stream)

    # -- copies ------------------------------------------------------------------------------------
    def copy_to_device(self, target: int, array: np.ndarray, stream) -> None:
        kind = self.api.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync", target, array.ctypes.data, array.nbytes, kind, stream)

    def copy_to_host(self, target: np.ndarray, source: int, nbytes: int, stream) -> None:
        kind = self.api.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync", target.ctypes.data, source, nbytes, kind, stream)

    def enqueue_copies(self, copies: list[PitchedCopy], source: int, target: int, stream) -> None:
        """Device-to-device copies of a plan, from the buffer at `source` into the one at `target`."""
        kind = self.api.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for copy in copies:
            self.call(
                "cudaMemcpy2DAsync",
                target + copy.target_offset,
                copy.target_pitch,
                source + copy.source_offset,
                copy.source_pitch,
                copy.width,
                copy.height,
                kind,
                stream,
            )


# -- memory a backend owns --------------------------------------------------------------------------
class Allocations:
    """Device buffers, pinned host arrays and streams created for one owner, all freed by `free_all`."""

    def __init__(self, cuda: CudaRuntime):
        self.cuda = cuda
        self.device_pointers: list[int] = []
        self.host_pointers: list[int] = []
        self.streams: list = []

    def device(self, nbytes: int) -> int:
        pointer = self.cuda.call("cudaMalloc", nbytes)
        self.device_pointers.append(pointer)
        return pointer

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy array in page-locked host memory, so device-to-host copies into it are truly asynchronous."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pointer = self.cuda.call("cudaMallocHost", nbytes)
        self.host_pointers.append(pointer)
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(pointer), dtype=dtype).reshape(shape)

    def stream(self):
        stream = self.cuda.create_stream()
        self.streams.append(stream)
        return stream

    def free_all(self) -> None:
        """Wait for this owner's streams, then free everything it allocated."""
        for stream in self.streams:
            self.cuda.synchronize(stream)
        for pointer in self.device_pointers:
            self.cuda.call("cudaFree", pointer)
        for pointer in self.host_pointers:
            self.cuda.call("cudaFreeHost", pointer)
        for stream in self.streams:
            self.cuda.destroy_stream(stream)
        self.device_pointers, self.host_pointers, self.streams = [], [], []


class LeasePool(Generic[Item]):
    """Per-caller resources (context sets, streams): one caller holds an item at a time.

    Items are created on demand, up to `limit` of them (None: no limit); past it, callers wait
    until one is given back. Returned items are reused. `give_back` may run in a weakref finalizer,
    on whatever thread the garbage collector interrupts, hence the reentrant lock. After `close`,
    waiting callers raise and returned items are destroyed instead of kept.
    """

    def __init__(self, create: Callable[[], Item], destroy: Callable[[Item], None], limit: int | None = None):
        self._create = create
        self._destroy = destroy
        self._limit = limit
        self._idle: list[Item] = []
        self._created = 0
        self._changed = threading.Condition(threading.RLock())
        self._closed = False

    def checkout(self) -> Item:
        with self._changed:
            while not self._idle and self._at_limit():
                self._check_open()
                self._changed.wait()
            self._check_open()
            if self._idle:
                return self._idle.pop()
            self._created += 1
        try:
            return self._create()  # outside the lock: others may reuse returned items meanwhile
        except BaseException:
            with self._changed:
                self._created -= 1
                self._changed.notify()
            raise

    def _at_limit(self) -> bool:
        return self._limit is not None and self._created >= self._limit

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this backend is closed; load the bundle again to keep predicting")

    def give_back(self, item: Item) -> None:
        with self._changed:
            if not self._closed:
                self._idle.append(item)
                self._changed.notify()
                return
        self._destroy(item)

    @contextmanager
    def lease(self) -> Iterator[Item]:
        item = self.checkout()
        try:
            yield item
        finally:
            self.give_back(item)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify_all()
        for item in idle:
            self._destroy(item)


# -- compaction planning ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PitchedCopy:
    """One cudaMemcpy2DAsync: `height` blocks of `width` bytes, `source_pitch` apart in the source, `target_pitch` apart in the target."""

    source_offset: int
    target_offset: int
    width: int
    height: int
    source_pitch: int
    target_pitch: int


@dataclass(frozen=True)
class Compaction:
    """How a batch state shrinks: its new size and the copies that gather hidden state and bias."""

    rows: int
    sequence_length: int
    row_extents: np.ndarray
    hidden_copies: list[PitchedCopy]
    bias_copies: list[PitchedCopy]


def row_extents(attention_mask: np.ndarray) -> np.ndarray:
    """Per row, one past its last attended position: what the row needs of the sequence axis."""
    attended = attention_mask != 0
    return attended.shape[1] - np.argmax(attended[:, ::-1], axis=1)


def runs_of_true(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every run of consecutive true values."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(start), int(stop - start)) for start, stop in zip(edges[::2], edges[1::2])]


def plan_row_copies(
    keep: np.ndarray, sequence_length: int, kept_length: int, position_bytes: int
) -> list[PitchedCopy]:
    """Copies gathering the kept rows of a row-major [rows, sequence, ...] tensor, each trimmed to kept_length positions.

    Adjacent kept rows form one 2D copy: source blocks sit a full row apart, target blocks a trimmed row apart.
    """
    source_pitch = sequence_length * position_bytes
    target_pitch = kept_length * position_bytes
    copies = []
    target_row = 0
    for first_row, count in runs_of_true(keep):
        copies.append(
            PitchedCopy(
                first_row * source_pitch,
                target_row * target_pitch,
                target_pitch,
                count,
                source_pitch,
                target_pitch,
            )
        )
        target_row += count
    return copies


def plan_compaction(
    keep: np.ndarray,
    extents: np.ndarray,
    sequence_length: int,
    hidden_position_bytes: int,
    bias_position_bytes: int,
) -> Compaction:
    """Keep the rows where `keep` is true; drop trailing positions no kept row attends to.

    Hidden state [B, S, H] and bias [B, 1, 1, S] are both row-major with the sequence axis right
    after the rows, so one plan shape serves both, with different bytes per position.
    """
    kept_extents = extents[keep]
    kept_length = int(kept_extents.max())
    return Compaction(
        rows=int(keep.sum()),
        sequence_length=kept_length,
        row_extents=kept_extents,
        hidden_copies=plan_row_copies(keep, sequence_length, kept_length, hidden_position_bytes),
        bias_copies=plan_row_copies(keep, sequence_length, kept_length, bias_position_bytes),
    )


def require_cuda(backend: str, problems: list[str]) -> CudaRuntime:
    """cudart for `backend`, or one BackendUnavailableError listing everything missing (given problems and CUDA's)."""
    cuda = None
    try:
        cuda = CudaRuntime.load()
    except BackendUnavailableError as error:
        problems = [*problems, str(error)]
    if problems:
        raise BackendUnavailableError(
            f"the {backend} backend cannot run here; it needs " + "; ".join(problems)
        )
    return cuda
