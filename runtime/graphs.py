"""Declarative specs of the bundle's graphs: names, dtypes and axes of every input and output.

One spec drives the ONNX export (names, dynamic axes), the parity check, the manifest entries,
and the runtime's bindings, so the four can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

BATCH = "batch_size"
SEQUENCE = "sequence_length"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
HIDDEN_STATES = "hidden_states"
ATTENTION_BIAS = "attention_bias"
NEXT_HIDDEN_STATES = "next_hidden_states"
LOGITS = "logits"
ENTROPY = "normalized_entropy"
MAX_PROBABILITY = "max_probability"
CONFIDENCE_SCORE = "confidence_score"

EMBEDDINGS_GRAPH = "embeddings"
FULL_GRAPH = "full_model"  # the whole model as one graph, exported with --with-full-graph
GRAPH_NAME_KEY = "pcee.graph"  # ONNX metadata: which graph of the chain a file holds


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: int64, float32, float16
    shape: tuple  # ints for fixed axes, BATCH / SEQUENCE for dynamic ones

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    kind: str  # "embeddings" | "layer" | "full"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @cached_property  # read on every layer call of the runtime's hot loop
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @cached_property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The torch.onnx.export form: {tensor name: {axis index: axis name}}."""
        return {
            tensor.name: {axis: dim for axis, dim in enumerate(tensor.shape) if isinstance(dim, str)}
            for tensor in self.inputs + self.outputs
        }

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def token_inputs(uses_token_type_ids: bool) -> tuple[TensorSpec, ...]:
    names = (INPUT_IDS, ATTENTION_MASK) + ((TOKEN_TYPE_IDS,) if uses_token_type_ids else ())
    return tuple(TensorSpec(name, "int64", (BATCH, SEQUENCE)) for name in names)


def exit_outputs(num_labels: int, learned_confidence: bool) -> tuple[TensorSpec, ...]:
    outputs = [
        TensorSpec(LOGITS, "float32", (BATCH, num_labels)),
        TensorSpec(ENTROPY, "float32", (BATCH,)),
        TensorSpec(MAX_PROBABILITY, "float32", (BATCH,)),
    ]
    if learned_confidence:
        outputs.append(TensorSpec(CONFIDENCE_SCORE, "float32", (BATCH,)))
    return tuple(outputs)


def hidden_spec(name: str, hidden_size: int, dtype: str) -> TensorSpec:
    return TensorSpec(name, dtype, (BATCH, SEQUENCE, hidden_size))


def bias_spec(dtype: str) -> TensorSpec:
    return TensorSpec(ATTENTION_BIAS, dtype, (BATCH, 1, 1, SEQUENCE))


def embeddings_spec(uses_token_type_ids: bool, hidden_size: int, dtype: str = "float32") -> GraphSpec:
    return GraphSpec(
        "embeddings",
        token_inputs(uses_token_type_ids),
        (hidden_spec(HIDDEN_STATES, hidden_size, dtype), bias_spec(dtype)),
    )


def layer_spec(
    hidden_size: int, num_labels: int, learned_confidence: bool, dtype: str = "float32"
) -> GraphSpec:
    return GraphSpec(
        "layer",
        (hidden_spec(HIDDEN_STATES, hidden_size, dtype), bias_spec(dtype)),
        (hidden_spec(NEXT_HIDDEN_STATES, hidden_size, dtype),) + exit_outputs(num_labels, learned_confidence),
    )


def full_model_spec(uses_token_type_ids: bool, num_labels: int) -> GraphSpec:
    """The whole network as one graph (last exit only): the reference the benchmarks compare against."""
    return GraphSpec(
        "full", token_inputs(uses_token_type_ids), (TensorSpec(LOGITS, "float32", (BATCH, num_labels)),)
    )


def spec_from_dict(kind: str, data: dict) -> GraphSpec:
    return GraphSpec(
        kind,
        tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
        tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
    )


def layer_graph_name(index: int) -> str:
    """The name of 0-based layer `index`'s graph: layer_01, layer_02, ..."""
    return f"layer_{index + 1:02d}"


@dataclass(frozen=True)
class LocatedGraph:
    """A graph file of the chain, with its name in the chain and its declared spec."""

    name: str  # "embeddings", "layer_01", ...
    path: Path
    spec: GraphSpec


@dataclass(frozen=True)
class GraphChain:
    """What a backend is built from: the embeddings graph and one graph per layer, in order.

    full: the whole model as one graph, when the bundle has one (the single-graph backend runs it).
    """

    embeddings: LocatedGraph
    layers: tuple[LocatedGraph, ...]
    full: LocatedGraph | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_spec(self) -> GraphSpec:
        return self.layers[0].spec


@dataclass(frozen=True)
class EngineChain:
    """What the TensorRT backend is built from besides the graph chain: one engine file per graph."""

    embeddings: Path
    layers: tuple[Path, ...]
    max_batch_size: int
    max_seq_len: int
    built_with: str  # "TensorRT 10.3.0 on NVIDIA H200": engines load only there


def signature_mismatches(spec: GraphSpec, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> list[str]:
    """How a graph's actual inputs and outputs differ from its spec: names, order, ranks, dtypes, fixed axes.

    A dynamic axis of the spec matches anything; a fixed one (the label count, the hidden size)
    must match exactly where the graph declares a number.
    """
    problems = []
    for role, declared, actual in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        if [t.name for t in declared] != [t.name for t in actual]:
            problems.append(
                f"{role} are {[t.name for t in actual]}, the manifest declares {[t.name for t in declared]}"
            )
            continue
        for want, got in zip(declared, actual):
            problems.extend(tensor_mismatches(want, got))
    return problems


def tensor_mismatches(want: TensorSpec, got: TensorSpec) -> list[str]:
    if len(want.shape) != len(got.shape):
        return [f"{got.name} has rank {len(got.shape)}, the manifest declares {len(want.shape)}"]
    problems = (
        [] if want.dtype == got.dtype else [f"{got.name} is {got.dtype}, the manifest declares {want.dtype}"]
    )
    for axis, (wanted, actual) in enumerate(zip(want.shape, got.shape)):
        if isinstance(wanted, int) and isinstance(actual, int) and wanted != actual:
            problems.append(f"{got.name} axis {axis} is {actual}, the manifest declares {wanted}")
    return problems
