"""TensorRT 10.1+ and 11 backend (v3 API only): one engine per graph, execution contexts pooled per concurrent caller.

Each batch state checks out a `ContextSet`: an execution context per engine, one CUDA stream, one
scratch block the contexts share (they run one after another on that stream), and device buffers
sized for the engines' optimization profile. The hidden state and attention bias stay on the
device in ping-pong buffers; a `run_layers` span enqueues every layer plus the copies of its small
exit outputs into pinned host memory, then synchronises the stream once. The pool holds at most
`max_concurrency` sets; more callers wait for one. A set goes back at `finish`, or when its batch
state is dropped.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import graphs
from ..errors import BackendError, BackendUnavailableError, BundleError, InputError
from ..exits import ExitRecord
from ..graphs import EngineChain, GraphChain
from ..tokenization import EncodedBatch
from . import DEFAULT_MAX_CONCURRENCY, tensorrt_version_problem
from .base import Backend
from .cuda_memory import (
    Allocations,
    Compaction,
    CudaRuntime,
    LeasePool,
    plan_compaction,
    require_cuda,
    row_extents,
)
from .onnxruntime_cpu import exit_record, feeds_for

REBUILD_HINT = "rebuild the engines on this machine with pcee-export --tensorrt"
PROFILE = 0  # the one optimization profile pcee-export builds into each engine


def import_tensorrt():
    """The tensorrt module, or None when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def tensorrt_problems(engines: EngineChain | None, trt) -> list[str]:
    problems = []
    if trt is None:
        problems.append("the tensorrt package (pip install 'pcee[gpu]')")
    elif (version_problem := tensorrt_version_problem(trt.__version__)) is not None:
        problems.append(version_problem)
    if engines is None:
        problems.append(
            "TensorRT engines in the bundle (export it with pcee-export --tensorrt on a GPU machine)"
        )
    return problems


def check_max_concurrency(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(
            f"max_concurrency must be a positive integer (callers served at once, each with its own execution contexts), got {value!r}"
        )


@functools.cache
def shared_logger(trt):
    # TensorRT keeps the first logger it is given per process; share one between backends.
    return trt.Logger(trt.Logger.WARNING)


# -- what the backend knows about the engines' tensors --------------------------------------------
@dataclass(frozen=True)
class ExitLayout:
    dtype: np.dtype
    shape: tuple[int, ...]  # the axes after the batch axis

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ProfileLimits:
    """The largest batch and sequence every engine's optimization profile accepts."""

    max_batch_size: int
    max_seq_len: int


@dataclass(frozen=True)
class TensorFacts:
    """Dtypes, sizes and profile limits every context set is built from."""

    token_dtypes: dict[str, np.dtype]
    hidden_dtype: np.dtype
    bias_dtype: np.dtype
    exits: dict[str, ExitLayout]
    hidden_size: int
    num_layers: int
    limits: ProfileLimits
    scratch_bytes: int  # the activation memory of the hungriest engine: one block serves a whole set

    @property
    def hidden_position_bytes(self) -> int:
        return self.hidden_size * self.hidden_dtype.itemsize


def tensor_dtype(trt, engine, name: str) -> np.dtype:
    return np.dtype(trt.nptype(engine.get_tensor_dtype(name)))


def tensor_facts(trt, chain: GraphChain, embeddings, layers: list) -> TensorFacts:
    layer_spec, layer = chain.layer_spec, layers[0]
    exits = {
        tensor.name: ExitLayout(tensor_dtype(trt, layer, tensor.name), tuple(tensor.shape[1:]))
        for tensor in layer_spec.outputs
        if tensor.name != graphs.NEXT_HIDDEN_STATES
    }
    return TensorFacts(
        token_dtypes={
            name: tensor_dtype(trt, embeddings, name) for name in chain.embeddings.spec.input_names
        },
        hidden_dtype=tensor_dtype(trt, layer, graphs.HIDDEN_STATES),
        bias_dtype=tensor_dtype(trt, layer, graphs.ATTENTION_BIAS),
        exits=exits,
        hidden_size=layer_spec.inputs[0].shape[2],
        num_layers=chain.num_layers,
        limits=profile_limits(
            [(embeddings, chain.embeddings.spec), *((engine, chain.layer_spec) for engine in layers)]
        ),
        # At least a byte: cudaMalloc(0) returns no pointer to hand the contexts.
        scratch_bytes=max(1, *(engine.device_memory_size_v2 for engine in [embeddings, *layers])),
    )


def profile_limits(engines: list[tuple[object, graphs.GraphSpec]]) -> ProfileLimits:
    """What every engine takes, read from the engines themselves: the smallest profile maximum of each dynamic axis."""
    maximum = {graphs.BATCH: [], graphs.SEQUENCE: []}
    for engine, spec in engines:
        for tensor in spec.inputs:
            shapes = engine.get_tensor_profile_shape(tensor.name, PROFILE)
            if len(shapes) != 3:  # (min, opt, max); empty when the engine has no such profile
                raise BundleError(
                    f"a {spec.kind} engine has no optimization profile for {tensor.name}; {REBUILD_HINT}"
                )
            largest = tuple(shapes[2])
            for axis, dim in enumerate(tensor.shape):
                if dim in maximum:
                    maximum[dim].append(largest[axis])
    return ProfileLimits(min(maximum[graphs.BATCH]), min(maximum[graphs.SEQUENCE]))


# -- engines ---------------------------------------------------------------------------------------
def deserialize(trt, runtime, path: Path, built: str):
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} cannot load {path} (built with {built}); an engine loads only with the "
            f"TensorRT version and GPU model it was built for: {REBUILD_HINT}"
        )
    return engine


def check_tensor_names(engine, spec: graphs.GraphSpec, path: Path) -> None:
    present = {engine.get_tensor_name(index) for index in range(engine.num_io_tensors)}
    missing = [name for name in spec.input_names + spec.output_names if name not in present]
    if missing:
        raise BundleError(f"{path} has no tensors named {missing} (it has {sorted(present)}); {REBUILD_HINT}")


class BoundContext:
    """One execution context. Shapes and addresses are set again only when they change; every bool is checked."""

    def __init__(self, engine, label: str, allocation_strategy):
        self.context = engine.create_execution_context(allocation_strategy)
        if self.context is None:
            raise BackendError(
                f"TensorRT could not create an execution context for the {label} (out of GPU memory?)"
            )
        self.label = label
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def use_scratch(self, pointer: int, nbytes: int) -> None:
        """The activation memory this context runs in (created with the user-managed strategy)."""
        self.context.set_device_memory(pointer, nbytes)

    def set_shape(self, tensor: str, shape: tuple[int, ...]) -> None:
        if self.shapes.get(tensor) == shape:
            return
        self.shapes.pop(tensor, None)
        if not self.context.set_input_shape(tensor, shape):
            raise BackendError(
                f"{self.label}: TensorRT rejected shape {shape} for {tensor}; it lies outside the engine's optimization profile"
            )
        self.shapes[tensor] = shape

    def set_address(self, tensor: str, address: int) -> None:
        if self.addresses.get(tensor) == address:
            return
        self.addresses.pop(tensor, None)
        if not self.context.set_tensor_address(tensor, address):
            raise BackendError(f"{self.label}: TensorRT refused the device address for {tensor}")
        self.addresses[tensor] = address

    def execute(self, stream) -> None:
        if not self.context.execute_async_v3(int(stream)):
            raise BackendError(
                f"{self.label}: TensorRT execute_async_v3 failed; the TensorRT log above says why"
            )


@dataclass
class TensorRTBatchState:
    contexts: ContextSet
    rows: int
    sequence_length: int
    row_extents: np.ndarray
    hidden_index: int = 0  # which ping-pong buffer holds the current hidden state
    bias_index: int = 0
    release: weakref.finalize | None = None  # gives the contexts back once: at finish(), or when dropped

    def shrink(self, plan: Compaction) -> None:
        """After the plan's copies went into the other buffers, they become the current ones."""
        self.rows, self.sequence_length, self.row_extents = plan.rows, plan.sequence_length, plan.row_extents
        self.hidden_index, self.bias_index = 1 - self.hidden_index, 1 - self.bias_index


class ContextSet:
    """What one caller uses at a time: a context per engine, a stream, device buffers and pinned exit slots."""

    def __init__(
        self,
        cuda: CudaRuntime,
        embeddings_engine,
        layer_engines: list,
        facts: TensorFacts,
        allocation_strategy,
    ):
        self.cuda = cuda
        self.facts = facts
        self.memory = Allocations(cuda)
        try:
            self.embeddings = BoundContext(embeddings_engine, "embeddings engine", allocation_strategy)
            self.layers = [
                BoundContext(engine, f"layer {index + 1} engine", allocation_strategy)
                for index, engine in enumerate(layer_engines)
            ]
            self.allocate_buffers()
        except BaseException:
            self.memory.free_all()
            raise

    def allocate_buffers(self) -> None:
        facts, memory = self.facts, self.memory
        self.stream = memory.stream()
        # The set's contexts run one after another on self.stream, so one block serves them all.
        scratch = memory.device(facts.scratch_bytes)
        for context in (self.embeddings, *self.layers):
            context.use_scratch(scratch, facts.scratch_bytes)
        rows = facts.limits.max_batch_size
        positions = rows * facts.limits.max_seq_len
        self.tokens = {
            name: memory.device(positions * dtype.itemsize) for name, dtype in facts.token_dtypes.items()
        }
        self.hidden = [memory.device(positions * facts.hidden_position_bytes) for _ in range(2)]
        self.bias = [memory.device(positions * facts.bias_dtype.itemsize) for _ in range(2)]
        self.exit_buffers = {name: memory.device(rows * exit.row_bytes) for name, exit in facts.exits.items()}
        # One pinned slot per layer, so a span of layers copies every exit out before its single sync.
        self.exit_slots = {
            name: memory.pinned((facts.num_layers, rows, *exit.shape), exit.dtype)
            for name, exit in facts.exits.items()
        }

    def enqueue_embeddings(self, feeds: dict[str, np.ndarray]) -> None:
        context = self.embeddings
        for name, array in feeds.items():
            # Pageable source: cudaMemcpyAsync returns once the array is staged, so it may be freed after.
            self.cuda.copy_to_device(
                self.tokens[name],
                np.ascontiguousarray(array, dtype=self.facts.token_dtypes[name]),
                self.stream,
            )
            context.set_shape(name, array.shape)
            context.set_address(name, self.tokens[name])
        context.set_address(graphs.HIDDEN_STATES, self.hidden[0])
        context.set_address(graphs.ATTENTION_BIAS, self.bias[0])
        context.execute(self.stream)

    def enqueue_layer(self, layer: int, slot: int, state: TensorRTBatchState) -> None:
        context = self.layers[layer]
        rows, length = state.rows, state.sequence_length
        context.set_shape(graphs.HIDDEN_STATES, (rows, length, self.facts.hidden_size))
        context.set_shape(graphs.ATTENTION_BIAS, (rows, 1, 1, length))
        context.set_address(graphs.HIDDEN_STATES, self.hidden[state.hidden_index])
        context.set_address(graphs.ATTENTION_BIAS, self.bias[state.bias_index])
        context.set_address(graphs.NEXT_HIDDEN_STATES, self.hidden[1 - state.hidden_index])
        for name, pointer in self.exit_buffers.items():
            context.set_address(name, pointer)
        context.execute(self.stream)
        # Same stream: the next layer overwrites the exit buffers only after these copies ran.
        for name, exit in self.facts.exits.items():
            self.cuda.copy_to_host(
                self.exit_slots[name][slot], self.exit_buffers[name], rows * exit.row_bytes, self.stream
            )

    def enqueue_compaction(self, state: TensorRTBatchState, plan: Compaction) -> None:
        hidden, bias = state.hidden_index, state.bias_index
        self.cuda.enqueue_copies(
            plan.hidden_copies, self.hidden[hidden], self.hidden[1 - hidden], self.stream
        )
        self.cuda.enqueue_copies(plan.bias_copies, self.bias[bias], self.bias[1 - bias], self.stream)

    def synchronize(self) -> None:
        self.cuda.synchronize(self.stream)

    def exit_records(self, count: int, rows: int) -> list[ExitRecord]:
        # astype copies: the pinned slots are overwritten by this set's next span.
        return [
            exit_record(
                {name: slots[slot, :rows].astype(np.float32) for name, slots in self.exit_slots.items()}
            )
            for slot in range(count)
        ]

    def destroy(self) -> None:
        self.embeddings, self.layers = None, []
        self.memory.free_all()


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self, chain: GraphChain, engines: EngineChain | None, max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    ):
        super().__init__(chain.num_layers)
        check_max_concurrency(max_concurrency)
        trt = import_tensorrt()
        self.cuda = require_cuda("tensorrt", tensorrt_problems(engines, trt))
        self.chain, self.engines = chain, engines
        self.allocation_strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.runtime = trt.Runtime(shared_logger(trt))
        if self.runtime is None:
            raise BackendUnavailableError(
                "TensorRT could not create a runtime (is the GPU visible to this process?)"
            )
        self.embeddings_engine = self.load_engine(trt, engines.embeddings, chain.embeddings.spec)
        self.layer_engines = [
            self.load_engine(trt, path, graph.spec) for path, graph in zip(engines.layers, chain.layers)
        ]
        if len(self.layer_engines) != self.num_layers:
            raise BundleError(
                f"the manifest lists {len(self.layer_engines)} layer engines for {self.num_layers} layers; {REBUILD_HINT}"
            )
        self.facts = tensor_facts(trt, chain, self.embeddings_engine, self.layer_engines)
        self._device = self.cuda.device_description()
        self.pool: LeasePool[ContextSet] = LeasePool(
            self.create_context_set, ContextSet.destroy, limit=max_concurrency
        )
        # Build one set now, so missing GPU memory fails the load rather than the first request.
        self.pool.give_back(self.pool.checkout())

    def load_engine(self, trt, path: Path, spec: graphs.GraphSpec):
        engine = deserialize(trt, self.runtime, path, self.engines.built_with)
        check_tensor_names(engine, spec, path)
        return engine

    def create_context_set(self) -> ContextSet:
        return ContextSet(
            self.cuda, self.embeddings_engine, self.layer_engines, self.facts, self.allocation_strategy
        )

    @property
    def device(self) -> str:
        return self._device

    @property
    def max_rows(self) -> int:
        return self.facts.limits.max_batch_size

    def check_limits(self, batch: EncodedBatch) -> None:
        rows, length = batch.input_ids.shape
        limits = self.facts.limits
        if rows > limits.max_batch_size:
            raise InputError(
                f"a batch of {rows} rows exceeds the TensorRT engines' max_batch_size {limits.max_batch_size}; "
                f"predict with batch_size <= {limits.max_batch_size}, or rebuild with pcee-export --tensorrt --max-batch-size {rows}"
            )
        if length > limits.max_seq_len:
            raise InputError(
                f"sequences of {length} tokens exceed the TensorRT engines' max_seq_len {limits.max_seq_len}; "
                f"rebuild with pcee-export --tensorrt --max-seq-len {length}"
            )

    def _begin_impl(self, batch):
        self.check_limits(batch)
        contexts = self.pool.checkout()
        state = TensorRTBatchState(
            contexts, len(batch), batch.input_ids.shape[1], row_extents(batch.attention_mask)
        )
        state.release = weakref.finalize(state, self.pool.give_back, contexts)
        contexts.enqueue_embeddings(feeds_for(self.chain.embeddings.spec, batch))
        return state

    def _run_layers_impl(self, state, first_layer, count):
        contexts = state.contexts
        for slot in range(count):
            contexts.enqueue_layer(first_layer + slot, slot, state)
            state.hidden_index = 1 - state.hidden_index
        contexts.synchronize()
        return contexts.exit_records(count, state.rows)

    def _compact_impl(self, state, keep):
        plan = plan_compaction(
            keep,
            state.row_extents,
            state.sequence_length,
            self.facts.hidden_position_bytes,
            self.facts.bias_dtype.itemsize,
        )
        state.contexts.enqueue_compaction(state, plan)
        state.shrink(plan)
        return state

    def _finish_impl(self, state):
        state.release()

    def close(self) -> None:
        self.pool.close()
        # Contexts still checked out keep their engines alive until they come back.
        self.embeddings_engine, self.layer_engines, self.runtime = None, [], None
