"""onnxruntime CPU graph optimizations, torch-free: transformer fusions, dynamic int8 quantization, operator counts.

onnxruntime's transformer optimizer (`optimize_model`, model type bert: what Optimum's O2 runs) fuses
`SkipLayerNormalization` and `BiasGelu` in our graphs but not attention: its pattern matcher does
not recognise the attention transformers 5 traces with a precomputed additive bias. So a fused export
writes attention itself as onnxruntime's `Attention` operator (`graphs.contrib_attention`), and
`fuse_graph` then fuses the rest (BiasGelu; SkipLayerNormalization measured slower, see there).
Fused graphs run on onnxruntime only; TensorRT builds its engines from the portable, unfused graphs.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx

from pcee.runtime import NEXT_HIDDEN_STATES

from .errors import ExportError

CONTRIB_DOMAIN = "com.microsoft"
INTEGER_OPERATORS = (
    "MatMulInteger",
    "DynamicQuantizeLinear",
)  # standard-domain operators of a quantized graph
QUANTIZED_OPERATORS = ["MatMul", "Attention"]
FLOAT_EXIT_HEADS = True


@dataclass(frozen=True)
class Fusion:
    """What onnxruntime's optimizer must be told about the model (it cannot always infer it from the graph)."""

    num_heads: int
    hidden_size: int

    @classmethod
    def of(cls, model) -> Fusion:
        """From a MultiExitClassifier's backbone config."""
        config = model.backbone_config
        num_heads = getattr(config, "num_attention_heads", None) or config.n_heads
        hidden_size = getattr(config, "hidden_size", None) or config.dim
        return cls(num_heads, hidden_size)


def fuse_graph(path: Path, fusion: Fusion, as_optimum_o2: bool = False) -> None:
    """Run onnxruntime's transformer optimizer (model type bert) on the graph at `path`, in place.

    `as_optimum_o2`: every fusion on, as Optimum's O2 ships a graph (the benchmarks' baseline). Otherwise
    SkipLayerNormalization stays unfused: measured on the demo MiniLM single graph (2-core CPU, onnxruntime
    1.32, 256 SST-2 rows), it took batch 32 from 1.37 s to 1.63 s (batch 1: no difference), so residual
    adds and layer norms are left to onnxruntime's own session-level fusions.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = as_optimum_o2
    optimized = optimize_model(
        str(path),
        model_type="bert",
        num_heads=fusion.num_heads,
        hidden_size=fusion.hidden_size,
        optimization_options=options,
    )
    optimized.save_model_to_file(str(path))


def fused_operator_counts(path: Path) -> dict[str, int]:
    """How many of each onnxruntime contrib operator (fused or quantized) and integer operator the graph holds, by name."""
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = Counter(
        node.op_type
        for node in graph.node
        if node.domain == CONTRIB_DOMAIN or node.op_type in INTEGER_OPERATORS
    )
    return dict(sorted(counts.items()))


def exit_head_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes that feed only the exit outputs (pooling, classifier): the ones the next layer never reads."""
    producer = {output: node for node in graph.node for output in node.output}
    backbone, pending = set(), [NEXT_HIDDEN_STATES]
    while pending:
        node = producer.get(pending.pop())
        if node is not None and node.name not in backbone:
            backbone.add(node.name)
            pending.extend(node.input)
    return [node for node in graph.node if node.name not in backbone]


def float_head_exclusions(graph: onnx.GraphProto) -> list[str]:
    """The exit head's node names, as quantize_dynamic must be told them to leave the head float.

    Before quantizing, onnxruntime rewrites every Gemm as MatMul + Add named GEMM_MatMul and GEMM_Add,
    and quantizes that MatMul unless its new name is excluded too.
    """
    head = exit_head_nodes(graph)
    return [node.name for node in head] + [f"{node.name}_MatMul" for node in head if node.op_type == "Gemm"]


def integer_head_operators(path: Path) -> list[str]:
    """Integer operators inside the exit head of the graph at `path` (none when the head stayed float)."""
    return [
        node.op_type
        for node in exit_head_nodes(onnx.load(str(path)).graph)
        if node.op_type in INTEGER_OPERATORS
    ]


def quantize_graph(path: Path, float_exit_head: bool) -> None:
    """Dynamically quantize the MatMul and Attention weights of the graph at `path` to signed int8, in place.

    Measured on the demo MiniLM (SST-2 dev, 872 rows), label agreement with the float model per exit:
    per-tensor scales 0.88-0.96, per-channel 0.97-0.99; 7-bit weights (reduce_range) moved the last
    exit's accuracy from 0.828 to 0.836 (float: 0.837). `float_exit_head` keeps the exit head (pooling
    and classifier) float: its classifier is a few hundred weights per label, where quantizing saves
    nothing and adds four operators per layer that cost time at batch 1.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = float_head_exclusions(onnx.load(str(path)).graph) if float_exit_head else []
    quantized = path.with_name(path.name + ".int8")
    with root_logging_above(
        logging.WARNING
    ):  # its advice to run static-quantization preprocessing does not apply
        quantize_dynamic(
            path,
            quantized,
            op_types_to_quantize=QUANTIZED_OPERATORS,
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            # onnx shape inference cannot type what follows a contrib operator (the fused Attention); all of it is float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    quantized_head = integer_head_operators(quantized) if float_exit_head else []
    if quantized_head:  # the manifest would claim float exit heads that are not
        quantized.unlink()
        raise ExportError(
            f"onnxruntime's quantizer put {sorted(set(quantized_head))} into the exit head of {path.name} although it was "
            "excluded; this onnxruntime version names rewritten nodes differently: report it with `pip show onnxruntime`"
        )
    os.replace(quantized, path)


@contextmanager
def root_logging_above(level: int) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level + 1)
    try:
        yield
    finally:
        root.setLevel(previous)
