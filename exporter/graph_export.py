"""Every graph of a bundle traced from the model, and the whole model as one graph for benchmarks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pcee.modeling.model import MultiExitClassifier
from pcee.runtime import (
    EMBEDDINGS_GRAPH,
    FULL_GRAPH,
    GRAPH_DIR,
    GraphFile,
    GraphSpec,
    ModelInfo,
    embeddings_spec,
    full_model_spec,
    layer_graph_name,
    layer_spec,
    onnx_file,
    sha256_of,
)

from .graphs import EmbeddingsGraph, FullModelGraph, LayerGraph, contrib_attention
from .onnx_export import export_graph
from .optimize import Fusion, fused_operator_counts
from .options import DEFAULT_OPSET, ExportOptions, check_opset
from .parity import TokenBatch


def load_model(model_dir: Path) -> MultiExitClassifier:
    return prepare_for_export(MultiExitClassifier.from_pretrained(model_dir))


def prepare_for_export(model: MultiExitClassifier) -> MultiExitClassifier:
    # Eager attention traces to plain MatMul/Softmax with no shape-dependent Python branches.
    model.backbone.set_attn_implementation("eager")
    return model.eval()


@dataclass(frozen=True)
class GraphSpecs:
    embeddings: GraphSpec
    layer: GraphSpec
    full: GraphSpec

    @classmethod
    def of(cls, info: ModelInfo) -> GraphSpecs:
        return cls(
            embeddings_spec(info.uses_token_type_ids, info.hidden_size),
            layer_spec(info.hidden_size, info.num_labels, info.learned_confidence),
            full_model_spec(info.uses_token_type_ids, info.num_labels),
        )


def token_tensors(spec: GraphSpec, batch: TokenBatch) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch[name]) for name in spec.input_names)


def write_graph(
    bundle_dir: Path,
    name: str,
    module: torch.nn.Module,
    inputs: tuple,
    spec: GraphSpec,
    opset: int,
    fusion: Fusion | None,
) -> GraphFile:
    relative = onnx_file(name)
    export_graph(module, inputs, spec, bundle_dir / relative, opset, name, fusion)
    return graph_file(bundle_dir, relative, spec)


def graph_file(bundle_dir: Path, relative: str, spec: GraphSpec) -> GraphFile:
    return GraphFile(
        relative, sha256_of(bundle_dir / relative), spec, fused_operator_counts(bundle_dir / relative)
    )


def export_graphs(
    model: MultiExitClassifier,
    bundle_dir: Path,
    specs: GraphSpecs,
    trace_batch: TokenBatch,
    options: ExportOptions,
) -> tuple[GraphFile, list[GraphFile], GraphFile | None]:
    """Trace every graph on one real batch, feeding each layer the previous graph's outputs; fused when options.fuses."""
    (bundle_dir / GRAPH_DIR).mkdir()
    fusion = Fusion.of(model) if options.fuses else None
    progress = tqdm(
        total=model.num_layers + 1 + options.with_full_graph,
        desc="export",
        unit="graph",
        disable=not options.progress,
    )
    with progress, torch.no_grad(), fused_modules(model, fusion):
        embeddings_graph = EmbeddingsGraph(model)
        token_inputs = token_tensors(specs.embeddings, trace_batch)
        embeddings = write_graph(
            bundle_dir,
            EMBEDDINGS_GRAPH,
            embeddings_graph,
            token_inputs,
            specs.embeddings,
            options.opset,
            fusion,
        )
        progress.update()
        hidden, bias = embeddings_graph(*token_inputs)
        layers = []
        for index in range(model.num_layers):
            layer_graph = LayerGraph(model, index)
            layers.append(
                write_graph(
                    bundle_dir,
                    layer_graph_name(index),
                    layer_graph,
                    (hidden, bias),
                    specs.layer,
                    options.opset,
                    fusion,
                )
            )
            hidden = layer_graph(hidden, bias)[0]
            progress.update()
        full = None
        if options.with_full_graph:
            full_inputs = token_tensors(specs.full, trace_batch)
            full = write_graph(
                bundle_dir,
                FULL_GRAPH,
                FullModelGraph(model),
                full_inputs,
                specs.full,
                options.opset,
                fusion,
            )
            progress.update()
    return embeddings, layers, full


def fused_modules(model: MultiExitClassifier, fusion: Fusion | None):
    """Attention traced as onnxruntime's fused operator while fusing; the model's own modules otherwise."""
    return contextlib.nullcontext() if fusion is None else contrib_attention(model)


def export_full_graph(
    model_dir_or_model: str | Path | MultiExitClassifier,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    fuse: bool = False,
    num_layers: int | None = None,
) -> Path:
    """The whole model as one ONNX graph (last exit's logits), for benchmarks; traced on a dummy batch.

    A model passed in is switched to eval mode and eager attention (the same arithmetic as sdpa).
    With `fuse`, it gets the fusions a fused bundle's layer graphs get, fused attention included.
    With `num_layers`, the model cut to that many layers and their exit (a truncation).
    """
    check_opset(opset)
    if isinstance(model_dir_or_model, MultiExitClassifier):
        model = prepare_for_export(model_dir_or_model)
    else:
        model = load_model(Path(model_dir_or_model))
    spec = full_model_spec(model.adapter.uses_token_type_ids, model.pcee_config.num_labels)
    vocab_size = model.backbone_config.vocab_size
    dummy = {
        "input_ids": torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(2, 16, dtype=torch.int64),
        "token_type_ids": torch.zeros(2, 16, dtype=torch.int64),
    }
    dummy["attention_mask"][1, 10:] = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fusion = Fusion.of(model) if fuse else None
    with fused_modules(model, fusion):
        export_graph(
            FullModelGraph(model, num_layers),
            tuple(dummy[name] for name in spec.input_names),
            spec,
            path,
            opset,
            FULL_GRAPH,
            fusion,
        )
    return path
