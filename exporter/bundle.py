"""Turn a model directory into a verified bundle: per-layer ONNX graphs, parity, tokenizer, engines, manifest.

The bundle is written into a temporary directory next to the target, loaded back through the
runtime's own Manifest reader, and only then swapped into place, so a failed export never
leaves a half-written bundle or touches the previous one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pcee.modeling.config import PceeConfig
from pcee.modeling.data import DataError, get_task
from pcee.modeling.errors import ModelDirectoryError
from pcee.modeling.model import MultiExitClassifier
from pcee.runtime import (
    MANIFEST_NAME, FileEntry, GraphFile, GraphSpec, Manifest, ModelInfo, OperatingPoint, ParityResult, TensorRTEngines,
    TokenizerInfo, create_backend, graph_chain_of, layer_graph_name, replace_directory, sha256_of, staging_directory_for,
)
from pcee.runtime.graphs import EMBEDDINGS_GRAPH, embeddings_spec, full_model_spec, layer_spec

from .errors import ExportError, OutputDirectoryError
from .graphs import EmbeddingsGraph, FullModelGraph, LayerGraph
from .onnx_export import export_graph
from .opsets import DEFAULT_OPSET, check_opset
from .parity import FP16_TOLERANCE, FP32_TOLERANCE, TENSORRT_FP32_TOLERANCE, ParityTarget, TokenBatch, parity_batches, torch_exit_outputs, verify_parity
from .tensorrt import DEFAULT_MAX_BATCH_SIZE, ShapeRange, build_engines, require_tensorrt

ONNX_DIR = "onnx"
FULL_GRAPH = "full_model"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"
OPTIONAL_TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model",
)
BUNDLE_SUFFIX = "-pcee"

# Normalized entropy 0.3 is a binary exit with max probability ~0.95; two such exits in a row make a
# conservative start that stays close to full-model accuracy. pcee-calibrate replaces it with a
# point chosen for a target speed-up on the user's data.
DEFAULT_TAU = 0.3
DEFAULT_PATIENCE = 2


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    tensorrt: bool = False
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_seq_len: int | None = None  # None: the model's own max_seq_len
    with_full_graph: bool = False
    progress: bool = False


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
            "tensorrt": self.manifest.tensorrt is not None,
            "export_seconds": round(self.seconds, 2),
        }


def default_operating_point(num_layers: int) -> OperatingPoint:
    return OperatingPoint(
        "pcee", tau=DEFAULT_TAU, patience=min(DEFAULT_PATIENCE, num_layers), name="default", source="export default (uncalibrated)",
    )


# -- inputs ------------------------------------------------------------------------------------------
def load_model(model_dir: Path) -> MultiExitClassifier:
    return prepare_for_export(MultiExitClassifier.from_pretrained(model_dir))


def prepare_for_export(model: MultiExitClassifier) -> MultiExitClassifier:
    # Eager attention traces to plain MatMul/Softmax with no shape-dependent Python branches.
    model.backbone.set_attn_implementation("eager")
    return model.eval()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not (model_dir / TOKENIZER_JSON).is_file():
        raise ModelDirectoryError(
            f"{model_dir} has no {TOKENIZER_JSON}; the runtime tokenizes with it. Save the model with its fast "
            "tokenizer (pcee-train does), or add tokenizer.json from the backbone it was trained from."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # tokenizers and transformers raise many types for a damaged file
        raise ModelDirectoryError(f"{model_dir}: the tokenizer cannot be loaded ({type(error).__name__}: {error})") from None
    if tokenizer.pad_token is None:
        raise ModelDirectoryError(f"{model_dir}: the tokenizer has no padding token; batches cannot be padded. Set pad_token in tokenizer_config.json")
    return tokenizer


def resolve_max_seq_len(model: MultiExitClassifier, requested: int | None) -> int:
    max_seq_len = requested or model.pcee_config.max_seq_len
    limit = model.adapter.max_positions(model.backbone_config)
    if not 1 <= max_seq_len <= limit:
        raise ExportError(f"--max-seq-len {max_seq_len} is outside 1..{limit}, the positions this {model.backbone_config.model_type} model has")
    return max_seq_len


def task_type(config: PceeConfig) -> str:
    """Pair input when the training data had pairs, or (older models) when the GLUE task has them."""
    try:
        glue_pair = config.task is not None and get_task(config.task).is_pair
    except DataError:  # a custom task name says nothing
        glue_pair = False
    return "sentence_pair" if config.sentence_pair or glue_pair else "single_sentence"


def model_info(model: MultiExitClassifier, max_seq_len: int, fp16: bool) -> ModelInfo:
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
        task_type=task_type(config),
        metric=config.metric,
        precision="fp16" if fp16 else "fp32",
    )


# -- output directory --------------------------------------------------------------------------------
def default_bundle_dir(model_dir: Path) -> Path:
    model_dir = model_dir.resolve()
    return model_dir.with_name(model_dir.name + BUNDLE_SUFFIX)


def check_output_dir(output_dir: Path) -> None:
    """An existing bundle may be replaced, an empty directory filled; anything else is refused."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise OutputDirectoryError(f"--output {output_dir} is a file; pass a directory path for the bundle")
    if (output_dir / MANIFEST_NAME).is_file() or not any(output_dir.iterdir()):
        return
    raise OutputDirectoryError(
        f"--output {output_dir} is a non-empty directory without {MANIFEST_NAME}, so it is not a pcee bundle; "
        "refusing to replace it. Pass a new path, or an existing bundle to overwrite."
    )


@contextmanager
def staging_directory(output_dir: Path) -> Iterator[Path]:
    """A temporary sibling of output_dir (same filesystem, so the final rename is atomic), removed on failure."""
    staging = staging_directory_for(output_dir)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -- graphs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphSpecs:
    embeddings: GraphSpec
    layer: GraphSpec
    full: GraphSpec

    @classmethod
    def of(cls, info: ModelInfo) -> "GraphSpecs":
        return cls(
            embeddings_spec(info.uses_token_type_ids, info.hidden_size),
            layer_spec(info.hidden_size, info.num_labels, info.learned_confidence),
            full_model_spec(info.uses_token_type_ids, info.num_labels),
        )


def token_tensors(spec: GraphSpec, batch: TokenBatch) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch[name]) for name in spec.input_names)


def write_graph(bundle_dir: Path, name: str, module: torch.nn.Module, inputs: tuple, spec: GraphSpec, opset: int) -> GraphFile:
    relative = f"{ONNX_DIR}/{name}.onnx"
    export_graph(module, inputs, spec, bundle_dir / relative, opset, name)
    return GraphFile(relative, sha256_of(bundle_dir / relative), spec)


def export_graphs(
    model: MultiExitClassifier, bundle_dir: Path, specs: GraphSpecs, trace_batch: TokenBatch, options: ExportOptions
) -> tuple[GraphFile, list[GraphFile], GraphFile | None]:
    """Trace every graph on one real batch, feeding each layer the previous graph's outputs."""
    (bundle_dir / ONNX_DIR).mkdir()
    progress = tqdm(total=model.num_layers + 1 + options.with_full_graph, desc="export", unit="graph", disable=not options.progress)
    with progress, torch.no_grad():
        embeddings_graph = EmbeddingsGraph(model)
        token_inputs = token_tensors(specs.embeddings, trace_batch)
        embeddings = write_graph(bundle_dir, EMBEDDINGS_GRAPH, embeddings_graph, token_inputs, specs.embeddings, options.opset)
        progress.update()
        hidden, bias = embeddings_graph(*token_inputs)
        layers = []
        for index in range(model.num_layers):
            layer_graph = LayerGraph(model, index)
            layers.append(write_graph(bundle_dir, layer_graph_name(index), layer_graph, (hidden, bias), specs.layer, options.opset))
            hidden = layer_graph(hidden, bias)[0]
            progress.update()
        full = None
        if options.with_full_graph:
            full_inputs = token_tensors(specs.full, trace_batch)
            full = write_graph(bundle_dir, FULL_GRAPH, FullModelGraph(model), full_inputs, specs.full, options.opset)
            progress.update()
    return embeddings, layers, full


def export_full_graph(model_dir_or_model: str | Path | MultiExitClassifier, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """The whole model as one ONNX graph (last exit's logits), for benchmarks; traced on a dummy batch.

    A model passed in is switched to eval mode and eager attention (the same arithmetic as sdpa).
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
    export_graph(FullModelGraph(model), tuple(dummy[name] for name in spec.input_names), spec, path, opset, FULL_GRAPH)
    return path


# -- tokenizer ---------------------------------------------------------------------------------------
def copy_tokenizer(model_dir: Path, bundle_dir: Path) -> TokenizerInfo:
    (bundle_dir / TOKENIZER_DIR).mkdir()
    copied = []
    for name in (TOKENIZER_JSON, *OPTIONAL_TOKENIZER_FILES):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, bundle_dir / TOKENIZER_DIR / name)
            copied.append(FileEntry.of(bundle_dir, f"{TOKENIZER_DIR}/{name}"))
    return TokenizerInfo(copied)


# -- the whole export --------------------------------------------------------------------------------
def bundle_file_sizes(bundle_dir: Path) -> dict[str, int]:
    return {
        path.relative_to(bundle_dir).as_posix(): path.stat().st_size
        for path in sorted(bundle_dir.rglob("*")) if path.is_file()
    }


def write_bundle(model_dir: Path, bundle_dir: Path, options: ExportOptions) -> Manifest:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    info = model_info(model, resolve_max_seq_len(model, options.max_seq_len), options.fp16)
    batches = parity_batches(tokenizer, info.task_type == "sentence_pair", info.max_seq_len)
    reference = [torch_exit_outputs(model, batch) for batch in batches]  # always the float32 model
    if options.fp16:
        model.half()
    embeddings, layers, full = export_graphs(model, bundle_dir, GraphSpecs.of(info), batches[-1], options)
    operating_point = default_operating_point(info.num_layers)
    manifest = Manifest(
        model=info,
        tokenizer=copy_tokenizer(model_dir, bundle_dir),
        embeddings=embeddings,
        layers=layers,
        full_graph=full,
        parity=check_parity(bundle_dir, embeddings, layers, full, batches, reference, options.fp16),
        operating_point=operating_point,
        operating_points=[operating_point],
    )
    if options.tensorrt:
        manifest.tensorrt = build_checked_engines(manifest, bundle_dir, batches, reference, options)
    manifest.save(bundle_dir)
    return Manifest.load(bundle_dir)  # the runtime's own reader must accept what was written


def check_parity(bundle_dir, embeddings, layers, full, batches, reference, fp16: bool) -> ParityResult:
    """The runtime's own CPU backend runs the chain; the single graph runs in one session."""
    backend = create_backend("onnxruntime-cpu", graph_chain_of(bundle_dir, embeddings, layers))
    try:
        return verify_parity([ParityTarget(backend, full, bundle_dir)], batches, reference, FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    finally:
        backend.close()


def build_checked_engines(manifest: Manifest, bundle_dir: Path, batches, reference, options: ExportOptions) -> TensorRTEngines:
    """Build the engines, then check them with the same parity code through the runtime's TensorRT backend."""
    shape_range = ShapeRange(options.max_batch_size, manifest.model.max_seq_len)
    manifest.tensorrt = build_engines(bundle_dir, manifest.embeddings, manifest.layers, shape_range, options.fp16, options.progress)
    backend = create_backend("tensorrt", manifest.graph_chain(bundle_dir), manifest.engine_chain(bundle_dir))
    try:
        tolerance = FP16_TOLERANCE if options.fp16 else TENSORRT_FP32_TOLERANCE
        engine_parity = verify_parity([ParityTarget(backend, prefix="tensorrt/")], batches, reference, tolerance)
    finally:
        backend.close()
    manifest.parity.max_abs_diff.update(engine_parity.max_abs_diff)
    manifest.parity.backends.append(backend.name)
    return manifest.tensorrt


def export_bundle(model_dir: str | Path, output_dir: str | Path | None = None, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export `model_dir` (written by pcee-train) to a verified bundle at `output_dir` (default: MODEL_DIR-pcee)."""
    started = time.perf_counter()
    check_opset(options.opset)
    if options.max_batch_size < 1:
        raise ExportError(f"--max-batch-size {options.max_batch_size} must be at least 1")
    if options.tensorrt:
        require_tensorrt()
    model_dir = Path(model_dir)
    output_dir = Path(output_dir) if output_dir is not None else default_bundle_dir(model_dir)
    check_output_dir(output_dir)
    with staging_directory(output_dir) as staging:
        manifest = write_bundle(model_dir, staging, options)
        replace_directory(staging, output_dir)
    return ExportResult(output_dir, manifest, time.perf_counter() - started, bundle_file_sizes(output_dir))
