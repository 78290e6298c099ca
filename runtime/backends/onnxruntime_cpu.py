"""onnxruntime on the CPU: one session per graph, tuned for a chain of many small sessions."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .. import graphs
from ..errors import BundleError, PolicyError
from ..exits import ExitRecord
from ..graphs import GraphChain, GraphSpec, LocatedGraph, TensorSpec
from ..policies import ExitPolicy
from ..single_row import LAYER_TEST, SingleRowGraphs, exit_rule, threshold_feeds
from ..tokenization import EncodedBatch
from .base import Backend

ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def cpu_session_options(intra_op_threads: int | None = None, share_arena: bool = True) -> ort.SessionOptions:
    """Options for every session this project creates; `share_arena` for CPU-only ones (see share_process_arena)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    # With one session per layer, spinning intra-op threads of the idle sessions steal the cores
    # of the running one: measured 1.9-2.0x the single graph's time with spinning, 1.00-1.06x
    # without. (onnxruntime's process-wide pool measured no better here, and it would force every
    # other session of a server's process onto it.)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if share_arena:
        share_process_arena(options)
    return options


# Session-level fusions that make our CPU graphs slower. SkipLayerNormFusion fires in a layer graph
# (residual add + LayerNorm) though not in the single graph; measured at batch 1, one thread, on the
# demo MiniLM: the int8 chain went from 1.65x to 1.23x the int8 single graph's time with it off,
# the fused float chain from 1.18x to 1.09x. CUDA sessions keep every fusion.
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]

_arena_lock = threading.Lock()
_arena_registered = False


def share_process_arena(options: ort.SessionOptions) -> None:
    """Make the session allocate from one CPU arena shared by every session of this process that opts in.

    Each session otherwise owns an arena, so a chain of seven sessions spreads its intermediate
    buffers over seven sets of memory; sharing one keeps them in cache between layers. Measured at
    batch 1, one thread: the float chain 1.10x -> 1.07x the single graph's time, the int8 chain
    1.23x -> 1.15x. The arena is registered once per process; sessions that do not opt in (anyone
    else's) are untouched.
    """
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            memory = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(
                memory, ort.OrtArenaCfg(0, -1, -1, -1)
            )  # -1: onnxruntime's defaults
            _arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def open_session(path: Path | bytes, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    """A session over a graph file (or a serialized model held in memory)."""
    disabled = CPU_DISABLED_OPTIMIZERS if providers == ["CPUExecutionProvider"] else None
    try:
        return ort.InferenceSession(
            path if isinstance(path, bytes) else str(path),
            sess_options=options,
            providers=providers,
            disabled_optimizers=disabled,
        )
    except Exception as error:  # onnxruntime raises its own exception types for bad graphs
        where = "the composed single-row graph" if isinstance(path, bytes) else path
        raise BundleError(
            f"{where} cannot be loaded by onnxruntime ({type(error).__name__}: {error}); re-export the bundle"
        ) from None


def open_cpu_session(path: str | Path, intra_op_threads: int | None = None) -> ort.InferenceSession:
    """One onnxruntime CPU session with the options the runtime uses (for a single-graph baseline)."""
    return open_session(Path(path), cpu_session_options(intra_op_threads), ["CPUExecutionProvider"])


def session_signature(node_args) -> list[TensorSpec]:
    return [
        TensorSpec(
            arg.name,
            ORT_DTYPES.get(arg.type, arg.type),
            tuple(dim if isinstance(dim, int) else "dynamic" for dim in arg.shape),
        )
        for arg in node_args
    ]


def check_session(session: ort.InferenceSession, graph: LocatedGraph) -> None:
    """The opened graph must be the one the manifest describes, at its place in the chain."""
    problems = graphs.signature_mismatches(
        graph.spec, session_signature(session.get_inputs()), session_signature(session.get_outputs())
    )
    recorded_name = session.get_modelmeta().custom_metadata_map.get(graphs.GRAPH_NAME_KEY)
    if recorded_name != graph.name:
        problems.append(
            f"the file says it holds graph {recorded_name!r}, the manifest puts it at {graph.name!r}"
        )
    if problems:
        raise BundleError(
            f"{graph.path} does not match the manifest: {'; '.join(problems)}; re-export the bundle"
        )


def open_checked_session(
    graph: LocatedGraph, options: ort.SessionOptions, providers: list
) -> ort.InferenceSession:
    session = open_session(graph.path, options, providers)
    check_session(session, graph)
    return session


def feeds_for(spec: GraphSpec, batch: EncodedBatch) -> dict[str, np.ndarray]:
    return token_feeds(spec.input_names, batch)


def token_feeds(input_names, batch: EncodedBatch) -> dict[str, np.ndarray]:
    arrays = {
        graphs.INPUT_IDS: batch.input_ids,
        graphs.ATTENTION_MASK: batch.attention_mask,
        graphs.TOKEN_TYPE_IDS: batch.token_type_ids,
    }
    return {name: arrays[name] for name in input_names}


def exit_record(outputs: dict[str, np.ndarray]) -> ExitRecord:
    return ExitRecord(
        logits=outputs[graphs.LOGITS],
        entropy=outputs[graphs.ENTROPY],
        max_probability=outputs[graphs.MAX_PROBABILITY],
        confidence_score=outputs.get(graphs.CONFIDENCE_SCORE),
    )


@dataclass
class CpuBatchState:
    hidden: np.ndarray
    bias: np.ndarray


class OnnxRuntimeCpuBackend(Backend):
    name = "onnxruntime"

    def __init__(self, chain: GraphChain, intra_op_threads: int | None = None):
        super().__init__(chain.num_layers)
        options = cpu_session_options(intra_op_threads)
        providers = ["CPUExecutionProvider"]
        self.embeddings = (open_checked_session(chain.embeddings, options, providers), chain.embeddings.spec)
        self.layers = [
            (open_checked_session(layer, options, providers), layer.spec) for layer in chain.layers
        ]
        self.single_row = SingleRowGraphs(
            chain, lambda model: open_session(model, options, providers), compose_single_row_graph
        )

    def single_row_graph(self) -> SingleRowGraphs | None:
        return self.single_row if self.use_single_row_graph else None

    @property
    def device(self) -> str:
        return "cpu"

    def _begin_impl(self, batch):
        session, spec = self.embeddings
        hidden, bias = session.run(spec.output_names, feeds_for(spec, batch))
        return CpuBatchState(hidden, bias)

    def _run_layers_impl(self, state, first_layer, count):
        records = []
        for index in range(first_layer, first_layer + count):
            session, spec = self.layers[index]
            values = session.run(
                spec.output_names, {graphs.HIDDEN_STATES: state.hidden, graphs.ATTENTION_BIAS: state.bias}
            )
            outputs = dict(zip(spec.output_names, values))
            state.hidden = outputs[graphs.NEXT_HIDDEN_STATES]
            records.append(exit_record(outputs))
        return records

    def _compact_impl(self, state, keep):
        bias = state.bias[keep]
        longest = longest_unmasked(bias)
        return CpuBatchState(
            np.ascontiguousarray(state.hidden[keep, :longest]), np.ascontiguousarray(bias[..., :longest])
        )


def longest_unmasked(bias: np.ndarray) -> int:
    """Length of the longest remaining row: padding columns past it can be dropped (they are masked anyway)."""
    attended = bias[:, 0, 0, :] == 0
    return int(attended.shape[1] - np.argmax(attended[:, ::-1].any(axis=0)))


def compose_single_row_graph(chain, rule, unrolled_layers=None):
    """Imported on first use: composing needs the `onnx` package, which a runtime-only install lacks."""
    from ..single_row_compose import compose_single_row_graph as compose

    return compose(chain, rule, unrolled_layers)


def compose_truncated_model(chain: GraphChain, layers: int) -> bytes:
    """The chain cut after `layers` layers as one serialized plain ONNX graph of the bundle's own nodes (needs
    `onnx`): the truncated model an early-exit point at that depth is measured against."""
    from ..single_row_compose import compose_truncated_graph

    return compose_truncated_graph(chain, layers).SerializeToString()


def compose_single_row_model(
    chain: GraphChain, policy: ExitPolicy, unrolled_layers: int | None = None
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The one graph a single row runs under `policy` (each exit decided inside it), serialized, and the threshold
    feeds it takes besides the token ids (needs `onnx`). `unrolled_layers`: instead, the nodes that graph runs
    for a row leaving after that many layers, every exit head and decision up to there, with no control flow
    (what the point's own work costs without `If`, for profiling)."""
    decision = exit_rule(policy)
    if decision is None:
        raise PolicyError(
            f"policy {policy.point.policy!r} has no single-row graph: its rows run through the chain"
        )
    rule, tau, patience = decision
    model = compose_single_row_graph(chain, rule, unrolled_layers).SerializeToString()
    return model, {} if rule.test == LAYER_TEST else threshold_feeds(tau, patience)
