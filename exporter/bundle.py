"""Turn a model directory into a verified bundle: per-layer ONNX graphs, parity, tokenizer, engines, manifest.

The bundle is written into a temporary directory next to the target, loaded back through the
runtime's own Manifest reader, and only then swapped into place, so a failed export never
leaves a half-written bundle or touches the previous one. The jobs it orchestrates live beside it:
options (options.py), the tokenizer (tokenizer.py), the output directory (output_directory.py) and
the graphs (graph_export.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pcee.modeling.config import PceeConfig, glue_task_or_none
from pcee.modeling.model import MultiExitClassifier
from pcee.runtime import (
    GraphFile,
    Manifest,
    ModelInfo,
    OperatingPoint,
    ParityResult,
    QuantizationResult,
    TensorRTEngines,
    TokenizerInfo,
    create_backend,
    graph_chain_of,
    layer_graph_name,
    replace_directory,
)

from .errors import ExportError
from .graph_export import GraphSpecs, export_graphs, graph_file, load_model
from .onnx_export import record_graph_name
from .optimize import FLOAT_EXIT_HEADS, quantize_graph
from .options import DEFAULT_PATIENCE, DEFAULT_POINT_NAME, DEFAULT_POINT_SOURCE, DEFAULT_TAU, ExportOptions
from .output_directory import check_output_dir, default_bundle_dir, remove_stale_debris, staging_directory
from .parity import (
    SENTENCE_PAIRS,
    SENTENCES,
    ParityTarget,
    TokenBatch,
    parity_batches,
    torch_exit_outputs,
    verify_parity,
)
from .quantize import (
    agreement_rows,
    check_agreement,
    load_parity_data,
    measure_agreement,
    torch_exit_labels,
)
from .tensorrt import ShapeRange, build_engines, require_tensorrt
from .tokenizer import check_vocabulary_size, load_tokenizer, write_tokenizer


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    seconds: float
    file_sizes: dict[str, int] = field(default_factory=dict)  # path relative to the bundle -> bytes

    def to_dict(self) -> dict:
        return {
            "bundle": str(self.bundle_dir),
            "files": self.file_sizes,
            "total_bytes": sum(self.file_sizes.values()),
            "parity": self.manifest.parity.to_dict(),
            "precision": self.manifest.model.precision,
            "fused_operators": {graph.file: graph.fused_operators for graph in self.manifest.graph_files()},
            "quantization": None
            if self.manifest.quantization is None
            else self.manifest.quantization.to_dict(),
            "tensorrt": self.manifest.tensorrt is not None,
            "export_seconds": round(self.seconds, 2),
        }


def default_operating_point(num_layers: int) -> OperatingPoint:
    return OperatingPoint(
        "pcee",
        tau=DEFAULT_TAU,
        patience=min(DEFAULT_PATIENCE, num_layers),
        name=DEFAULT_POINT_NAME,
        source=DEFAULT_POINT_SOURCE,
    )


def resolve_max_seq_len(model: MultiExitClassifier, requested: int | None) -> int:
    max_seq_len = requested or model.pcee_config.max_seq_len
    limit = model.adapter.max_positions(model.backbone_config)
    if not 1 <= max_seq_len <= limit:
        raise ExportError(
            f"--max-seq-len {max_seq_len} is outside 1..{limit}, the positions this {model.backbone_config.model_type} model has"
        )
    return max_seq_len


def task_type(config: PceeConfig) -> str:
    """Pair input when the training data had pairs, or (older models) when the GLUE task has them."""
    task = glue_task_or_none(config.task)
    return (
        "sentence_pair" if config.sentence_pair or (task is not None and task.is_pair) else "single_sentence"
    )


def model_info(model: MultiExitClassifier, max_seq_len: int, options: ExportOptions) -> ModelInfo:
    config = model.pcee_config
    return ModelInfo(
        architecture=model.backbone_config.model_type,
        num_layers=model.num_layers,
        hidden_size=model.backbone_config.hidden_size,
        labels=list(config.label_names),
        max_seq_len=max_seq_len,
        vocab_size=model.backbone_config.vocab_size,
        uses_token_type_ids=model.adapter.uses_token_type_ids,
        exit_pooling=config.exit_pooling,
        learned_confidence=config.learned_confidence,
        task=config.task,
        task_type=options.task_type or task_type(config),
        metric=config.metric,
        precision=options.precision,
    )


def bundle_file_sizes(bundle_dir: Path) -> dict[str, int]:
    return {
        path.relative_to(bundle_dir).as_posix(): path.stat().st_size
        for path in sorted(bundle_dir.rglob("*"))
        if path.is_file()
    }


def write_bundle(model_dir: Path, bundle_dir: Path, options: ExportOptions) -> Manifest:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokenizer_info = write_tokenizer(model_dir, bundle_dir, tokenizer)
    check_vocabulary_size(
        bundle_dir / tokenizer_info.files[0].file, tokenizer.source, model.backbone_config.vocab_size
    )
    info = model_info(model, resolve_max_seq_len(model, options.max_seq_len), options)
    batches = parity_batches(tokenizer.for_batches, info.task_type == "sentence_pair", info.max_seq_len)
    reference = [torch_exit_outputs(model, batch) for batch in batches]  # always the float32 model
    if options.fp16:
        model.half()
    embeddings, layers, full = export_graphs(model, bundle_dir, GraphSpecs.of(info), batches[-1], options)
    parity = check_parity(bundle_dir, embeddings, layers, full, batches, reference, options.parity_tolerance)
    quantization = None
    if options.quantize:
        layers = quantize_layers(bundle_dir, layers)
        quantization = check_quantized_chain(
            model, bundle_dir, embeddings, layers, tokenizer_info, info, options
        )
    operating_point = default_operating_point(info.num_layers)
    manifest = Manifest(
        model=info,
        tokenizer=tokenizer_info,
        embeddings=embeddings,
        layers=layers,
        full_graph=full,
        parity=parity,
        quantization=quantization,
        operating_point=operating_point,
        operating_points=[operating_point],
    )
    if options.tensorrt:
        manifest.tensorrt = build_checked_engines(manifest, bundle_dir, batches, reference, options)
    manifest.save(bundle_dir)
    return Manifest.load(bundle_dir)  # the runtime's own reader must accept what was written


def check_parity(bundle_dir, embeddings, layers, full, batches, reference, tolerance: float) -> ParityResult:
    """The runtime's own backends run the graphs: its CPU backend the chain, its single-graph backend the whole model."""
    chain = graph_chain_of(bundle_dir, embeddings, layers, full)
    backend = create_backend("onnxruntime-cpu", chain)
    single_graph = None if full is None else create_backend("onnxruntime-single-graph", chain)
    try:
        return verify_parity([ParityTarget(backend, single_graph)], batches, reference, tolerance)
    finally:
        backend.close()
        if single_graph is not None:
            single_graph.close()


def quantize_layers(bundle_dir: Path, layers: list[GraphFile]) -> list[GraphFile]:
    """The float layer graphs, already checked against PyTorch, quantized in place."""
    for index, layer in enumerate(layers):
        path = bundle_dir / layer.file
        quantize_graph(path, FLOAT_EXIT_HEADS)
        record_graph_name(path, layer_graph_name(index))
    return [graph_file(bundle_dir, layer.file, layer.spec) for layer in layers]


def check_quantized_chain(
    model: MultiExitClassifier,
    bundle_dir: Path,
    embeddings: GraphFile,
    layers: list[GraphFile],
    tokenizer: TokenizerInfo,
    info: ModelInfo,
    options: ExportOptions,
) -> QuantizationResult:
    """Label agreement of the int8 chain (through the runtime's CPU backend) with the float PyTorch model; fails below the minimum."""
    data = None if options.parity_data is None else load_parity_data(options.parity_data, info.task)
    texts = SENTENCE_PAIRS if info.task_type == "sentence_pair" else [(sentence,) for sentence in SENTENCES]
    rows = agreement_rows(bundle_dir / tokenizer.files[0].file, info.max_seq_len, texts, data, info.labels)
    backend = create_backend("onnxruntime-cpu", graph_chain_of(bundle_dir, embeddings, layers))
    try:
        result = measure_agreement(backend, rows, torch_exit_labels(model, rows.batch), options.min_agreement)
    finally:
        backend.close()
    check_agreement(result)
    return result


def build_checked_engines(
    manifest: Manifest, bundle_dir: Path, batches, reference, options: ExportOptions
) -> TensorRTEngines:
    """Build the engines, then check them with the same parity code through the runtime's TensorRT backend."""
    shape_range = ShapeRange(options.max_batch_size, manifest.model.max_seq_len)
    manifest.tensorrt = build_engines(
        bundle_dir, manifest.embeddings, manifest.layers, shape_range, options.fp16, options.progress
    )
    backend = create_backend("tensorrt", manifest.graph_chain(bundle_dir), manifest.engine_chain(bundle_dir))
    try:
        pieces, expected = rows_at_most(batches, reference, backend.max_rows)
        engine_parity = verify_parity(
            [ParityTarget(backend, prefix="tensorrt/")], pieces, expected, options.engine_tolerance
        )
    finally:
        backend.close()
    manifest.parity.max_abs_diff.update(engine_parity.max_abs_diff)
    manifest.parity.backends.append(backend.name)
    return manifest.tensorrt


def rows_at_most(
    batches: list[TokenBatch], reference: list, max_rows: int | None
) -> tuple[list[TokenBatch], list]:
    """The parity batches and their reference outputs cut into pieces of at most max_rows rows, each padded as before.

    Engines built with a --max-batch-size below the parity batches' take them piece by piece.
    """
    if max_rows is None:
        return batches, reference
    pieces, expected = [], []
    for batch, layers in zip(batches, reference):
        for start in range(0, len(batch["input_ids"]), max_rows):
            rows = slice(start, start + max_rows)
            pieces.append({name: values[rows] for name, values in batch.items()})
            expected.append([{name: values[rows] for name, values in outputs.items()} for outputs in layers])
    return pieces, expected


def export_bundle(
    model_dir: str | Path,
    output_dir: str | Path | None = None,
    options: ExportOptions | None = None,
    force: bool = False,
) -> ExportResult:
    """Export `model_dir` (written by pcee-train) to a verified bundle at `output_dir` (default: MODEL_DIR-pcee).

    `options` (default: ExportOptions()) checked themselves when they were built. An output bundle with
    saved operating points beyond the export default, or with calibration reports, is replaced only with
    `force`.
    """
    started = time.perf_counter()
    options = options or ExportOptions()
    if options.tensorrt:
        require_tensorrt()
    model_dir = Path(model_dir)
    output_dir = Path(output_dir) if output_dir is not None else default_bundle_dir(model_dir)
    check_output_dir(output_dir, force)
    remove_stale_debris(output_dir)
    with staging_directory(output_dir) as staging:
        manifest = write_bundle(model_dir, staging, options)
        replace_directory(staging, output_dir)
    return ExportResult(output_dir, manifest, time.perf_counter() - started, bundle_file_sizes(output_dir))
