"""Turn a model directory into a verified bundle: per-layer ONNX graphs, parity, tokenizer, engines, manifest.

The bundle is written into a temporary directory next to the target, loaded back through the
runtime's own Manifest reader, and only then swapped into place, so a failed export never
leaves a half-written bundle or touches the previous one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer, Tokenizer
from tokenizers.models import WordPiece
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from pcee.modeling.config import PceeConfig, glue_task_or_none
from pcee.modeling.errors import ModelDirectoryError
from pcee.modeling.model import CONFIG_NAME, MultiExitClassifier
from pcee.runtime import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    GraphFile,
    GraphSpec,
    Manifest,
    ModelInfo,
    OperatingPoint,
    ParityResult,
    PceeError,
    QuantizationResult,
    TensorRTEngines,
    TokenizerInfo,
    backup_directory_for,
    create_backend,
    graph_chain_of,
    layer_graph_name,
    replace_directory,
    sha256_of,
    staging_directory_for,
    staging_directory_pattern,
    written_before_this_process,
)
from pcee.runtime.graphs import EMBEDDINGS_GRAPH, FULL_GRAPH, embeddings_spec, full_model_spec, layer_spec
from pcee.runtime.manifest import TASK_TYPES

from .errors import ExportError, OutputDirectoryError, TokenizerError
from .graphs import EmbeddingsGraph, FullModelGraph, LayerGraph, contrib_attention
from .onnx_export import export_graph, record_graph_name
from .opsets import DEFAULT_MIN_AGREEMENT, DEFAULT_OPSET, FUSION_MIN_OPSET, QUANTIZATIONS, check_opset
from .optimize import FLOAT_EXIT_HEADS, Fusion, fused_operator_counts, quantize_graph
from .parity import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    SENTENCE_PAIRS,
    SENTENCES,
    TENSORRT_FP32_TOLERANCE,
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
from .tensorrt import DEFAULT_MAX_BATCH_SIZE, ENGINE_DIR, ShapeRange, build_engines, require_tensorrt

ONNX_DIR = "onnx"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
WORDPIECE_VOCABULARY = "vocab.txt"
OPTIONAL_TOKENIZER_FILES = (
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    WORDPIECE_VOCABULARY,
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
BERT_SPECIAL_TOKENS = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
BUNDLE_SUFFIX = "-pcee"
# What a bundle directory may hold besides what pcee-export writes: what pcee-calibrate adds (its
# recordings, .pcee-cache; its reports, reports/ and older calibration-* files; its manifest lock,
# .manifest.lock), and the temporary files of an atomic manifest write that a kill left behind
# (write_file_atomically names them .manifest.json.*). The calibration room is not imported here.
BUNDLE_ENTRY_PATTERNS = (
    MANIFEST_NAME,
    ONNX_DIR,
    ENGINE_DIR,
    TOKENIZER_DIR,
    ".pcee-cache",
    "reports",
    "calibration-*",
    ".manifest.lock",
    f".{MANIFEST_NAME}.*",
)

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
    task_type: str | None = None  # "single_sentence" or "sentence_pair"; None: what the model's config says
    with_full_graph: bool = False
    progress: bool = False
    # onnxruntime's transformer fusions: the fused float chain measured 1.02-1.03x (batch 1) and 0.99x
    # (batch 32) the portable chain's rows/s at a 50% point (docs/RESULTS.md). TensorRT, fp16 and
    # pre-17 opset bundles always get portable graphs.
    fuse: bool = True
    quantize: str | None = None  # "int8": dynamic quantization of the layer graphs' weights
    parity_data: Path | None = None  # labelled rows an int8 bundle's agreement and accuracy are measured on
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    @property
    def fuses(self) -> bool:
        return self.fuse and not (self.fp16 or self.tensorrt) and self.opset >= FUSION_MIN_OPSET

    @property
    def precision(self) -> str:
        return self.quantize or ("fp16" if self.fp16 else "fp32")


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
        name="default",
        source="export default (uncalibrated)",
    )


# -- inputs ------------------------------------------------------------------------------------------
def load_model(model_dir: Path) -> MultiExitClassifier:
    return prepare_for_export(MultiExitClassifier.from_pretrained(model_dir))


def prepare_for_export(model: MultiExitClassifier) -> MultiExitClassifier:
    # Eager attention traces to plain MatMul/Softmax with no shape-dependent Python branches.
    model.backbone.set_attn_implementation("eager")
    return model.eval()


@dataclass(frozen=True)
class ModelTokenizer:
    """The model's tokenizer: where the bundle's tokenizer.json comes from, and a transformers view for the parity batches."""

    source: Path  # the model directory's tokenizer.json, or the vocab.txt it was built from
    for_batches: PreTrainedTokenizerFast
    built: Tokenizer | None = None  # the tokenizer.json to write, when it was built from vocab.txt

    @property
    def built_from(self) -> str | None:
        return None if self.built is None else self.source.name


def load_tokenizer(model_dir: Path) -> ModelTokenizer:
    """The model's tokenizer.json; for a reference PABEE/PCEE checkpoint, which has none, one built from its vocab.txt."""
    if (model_dir / TOKENIZER_JSON).is_file():
        return ModelTokenizer(model_dir / TOKENIZER_JSON, load_fast_tokenizer(model_dir))
    if (model_dir / WORDPIECE_VOCABULARY).is_file():
        built = wordpiece_tokenizer(model_dir)
        return ModelTokenizer(model_dir / WORDPIECE_VOCABULARY, wrap_for_batches(built), built)
    raise ModelDirectoryError(
        f"{model_dir} has no {TOKENIZER_JSON} (and no BERT {WORDPIECE_VOCABULARY} to build one from); the runtime "
        "tokenizes with it. Save the model with its fast tokenizer (pcee-train does), or add tokenizer.json from "
        "the backbone it was trained from."
    )


def load_fast_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # tokenizers and transformers raise many types for a damaged file
        raise ModelDirectoryError(
            f"{model_dir}: the tokenizer cannot be loaded ({type(error).__name__}: {error})"
        ) from None
    if tokenizer.pad_token is None:
        raise ModelDirectoryError(
            f"{model_dir}: the tokenizer has no padding token; batches cannot be padded. Set pad_token in tokenizer_config.json"
        )
    return tokenizer


def wordpiece_tokenizer(model_dir: Path) -> Tokenizer:
    """BERT's tokenizer from a WordPiece vocab.txt: [CLS] A [SEP] for one text, [CLS] A [SEP] B [SEP] for a pair.

    Not transformers' BertTokenizerFast(vocab_file=...): in transformers 5 it silently builds a
    5-token vocabulary. The tokenizers library reads the whole file.
    """
    path = model_dir / WORDPIECE_VOCABULARY
    try:
        vocabulary = WordPiece.read_file(str(path))
    except Exception as error:  # the Rust reader raises plain Exception
        raise TokenizerError(
            f"{path} cannot be read as a WordPiece vocabulary, one token per line ({error})"
        ) from None
    missing = [token for token in BERT_SPECIAL_TOKENS.values() if token not in vocabulary]
    if missing:
        raise TokenizerError(
            f"{path} lacks {', '.join(missing)}, so it is not a BERT WordPiece vocabulary and cannot be turned into a "
            f"tokenizer. Add the model's own {TOKENIZER_JSON} to {model_dir}."
        )
    wordpiece = BertWordPieceTokenizer(vocabulary, **normalization(model_dir, vocabulary))
    return Tokenizer.from_str(wordpiece.to_str())


def normalization(model_dir: Path, vocabulary: dict[str, int]) -> dict[str, bool | None]:
    """The checkpoint's do_lower_case and strip_accents; without do_lower_case, the case the vocabulary shows."""
    settings = tokenizer_settings(model_dir)
    lowercase, strip_accents = settings.get("do_lower_case"), settings.get("strip_accents")
    return {
        "lowercase": lowercase if isinstance(lowercase, bool) else is_uncased(vocabulary),
        "strip_accents": strip_accents
        if isinstance(strip_accents, bool)
        else None,  # None: strip when lowercasing
    }


def tokenizer_settings(model_dir: Path) -> dict:
    """config.json overlaid with tokenizer_config.json, where transformers-3 checkpoints keep do_lower_case."""
    settings = {}
    for name in (CONFIG_NAME, TOKENIZER_CONFIG):
        path = model_dir / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TokenizerError(f"{path} is not valid JSON ({error}); fix or remove it") from None
        settings.update(data if isinstance(data, dict) else {})
    return settings


def is_uncased(vocabulary: dict[str, int]) -> bool:
    """BERT-uncased (the reference default) has no upper-case token besides its [SPECIAL] ones; a cased vocabulary has many."""
    return not any(
        token != token.lower() for token in vocabulary if not (token.startswith("[") and token.endswith("]"))
    )


def wrap_for_batches(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # A copy: transformers sets padding and truncation on the tokenizer it wraps, the bundle's must have neither.
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()), **BERT_SPECIAL_TOKENS
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


def check_task_type(requested: str | None) -> None:
    if requested is not None and requested not in TASK_TYPES:
        raise ExportError(
            f"--task-type {requested!r} is not one of {', '.join(TASK_TYPES)}; leave it out to use the model's own"
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


# -- output directory --------------------------------------------------------------------------------
def default_bundle_dir(model_dir: Path) -> Path:
    model_dir = model_dir.resolve()
    return model_dir.with_name(model_dir.name + BUNDLE_SUFFIX)


def check_output_dir(output_dir: Path) -> None:
    """The output, and the backup path the swap reuses, must each be absent, empty, or a pcee bundle of bundle files alone."""
    check_replaceable(output_dir, f"--output {output_dir}")
    backup = backup_directory_for(output_dir)
    check_replaceable(
        backup,
        f"{backup} (the path where pcee-export keeps the previous bundle while it swaps in the new one)",
    )


def check_replaceable(directory: Path, described: str) -> None:
    """Replacing a directory deletes all of it, so only what is provably a bundle is replaced."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise OutputDirectoryError(f"{described} is a file; pass a directory path for the bundle")
    entries = sorted(entry.name for entry in directory.iterdir())
    if not entries:
        return
    advice = f"Pass a new --output, or move {directory} away first."
    if MANIFEST_NAME not in entries:
        raise OutputDirectoryError(
            f"{described} is a non-empty directory without {MANIFEST_NAME}, so it is not a pcee bundle; "
            f"refusing to replace it. {advice}"
        )
    problem = manifest_problem(directory / MANIFEST_NAME)
    if problem is not None:
        raise OutputDirectoryError(
            f"{described} has a {MANIFEST_NAME} that is not a pcee bundle manifest ({problem}); refusing to replace "
            f"the directory, which would delete everything in it. {advice}"
        )
    foreign = [
        name for name in entries if not any(fnmatchcase(name, pattern) for pattern in BUNDLE_ENTRY_PATTERNS)
    ]
    if foreign:
        raise OutputDirectoryError(
            f"{described} is a pcee bundle but also holds {', '.join(foreign)}, which pcee-export did not write; "
            f"refusing to replace it, which would delete them. Move them out of the bundle, or pass a new --output."
        )


def manifest_problem(path: Path) -> str | None:
    """Why `path` is not a pcee bundle manifest; None when it is one, of this format or another pcee's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        return f"not JSON: {error}"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    version, producer = data.get("format_version"), data.get("producer")
    if producer != "pcee" or not isinstance(version, int) or isinstance(version, bool):
        return f"producer {producer!r} and format_version {version!r}, where pcee writes producer 'pcee' and an integer format_version"
    if version != FORMAT_VERSION:
        # Another pcee version wrote it (every pcee manifest has carried both marks). Its schema is not
        # this reader's to check, and exporting over an old bundle is how it gets upgraded.
        return None
    try:
        Manifest.from_dict(data, str(path))
    except PceeError as error:
        return str(error)
    return None


def remove_stale_debris(output_dir: Path) -> None:
    """Remove what killed exports to `output_dir` left beside it: staging directories, and a backup bundle.

    Only the exact `.NAME.<random>.partial` siblings that staging_directory_for makes, and only debris whose
    newest write is older than this process: an export running now keeps writing into its own. The backup
    (which check_output_dir found to be a bundle) goes only while the output exists: without the output,
    a kill between the swap's two renames left the backup as the one copy of the previous bundle.
    """
    if not output_dir.parent.is_dir():
        return
    staging_name = staging_directory_pattern(output_dir)
    stale = [
        entry
        for entry in output_dir.parent.iterdir()
        if staging_name.fullmatch(entry.name) and is_stale(entry)
    ]
    backup = backup_directory_for(output_dir)
    if output_dir.is_dir() and is_stale(backup):
        stale.append(backup)
    for directory in stale:
        shutil.rmtree(directory, ignore_errors=True)


def is_stale(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and written_before_this_process(path)


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
    relative = f"{ONNX_DIR}/{name}.onnx"
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
    (bundle_dir / ONNX_DIR).mkdir()
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
                bundle_dir, FULL_GRAPH, FullModelGraph(model), full_inputs, specs.full, options.opset, fusion
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


# -- tokenizer ---------------------------------------------------------------------------------------
def write_tokenizer(model_dir: Path, bundle_dir: Path, tokenizer: ModelTokenizer) -> TokenizerInfo:
    """tokenizer/tokenizer.json (copied, or the one built from vocab.txt) first, then the model's other tokenizer files."""
    target = bundle_dir / TOKENIZER_DIR
    target.mkdir()
    if tokenizer.built is not None:
        tokenizer.built.save(str(target / TOKENIZER_JSON))
    written = []
    for name in (TOKENIZER_JSON, *OPTIONAL_TOKENIZER_FILES):
        if (model_dir / name).is_file() and not (target / name).exists():
            shutil.copy2(model_dir / name, target / name)
        if (target / name).is_file():
            written.append(FileEntry.of(bundle_dir, f"{TOKENIZER_DIR}/{name}"))
    return TokenizerInfo(written, tokenizer.built_from)


def check_vocabulary_size(tokenizer_file: Path, source: Path, vocab_size: int) -> None:
    """The bundle's tokenizer must fit the embedding table the way the runtime will count it.

    Ids past the table fail at inference. A vocab.txt lists exactly the table's rows, so one of
    another length is another model's vocabulary whose ids would silently mean other tokens; a
    tokenizer.json may have fewer tokens than a table padded to a round size.
    """
    size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    if size > vocab_size or (source.name == WORDPIECE_VOCABULARY and size != vocab_size):
        raise TokenizerError(
            f"the tokenizer does not fit the model: tokenizer size {size} from {source} vs model config vocab_size "
            f"{vocab_size} from {source.parent / CONFIG_NAME} ({'more' if size > vocab_size else 'fewer'} tokens than the "
            f"embedding table has rows). Put the tokenizer files the model was trained with into {source.parent}."
        )


# -- the whole export --------------------------------------------------------------------------------
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
    parity = check_parity(bundle_dir, embeddings, layers, full, batches, reference, options.fp16)
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


def check_parity(bundle_dir, embeddings, layers, full, batches, reference, fp16: bool) -> ParityResult:
    """The runtime's own CPU backend runs the chain; the single graph runs in one session."""
    backend = create_backend("onnxruntime-cpu", graph_chain_of(bundle_dir, embeddings, layers))
    try:
        return verify_parity(
            [ParityTarget(backend, full, bundle_dir)],
            batches,
            reference,
            FP16_TOLERANCE if fp16 else FP32_TOLERANCE,
        )
    finally:
        backend.close()


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
        tolerance = FP16_TOLERANCE if options.fp16 else TENSORRT_FP32_TOLERANCE
        pieces, expected = rows_at_most(batches, reference, backend.max_rows)
        engine_parity = verify_parity(
            [ParityTarget(backend, prefix="tensorrt/")], pieces, expected, tolerance
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


def check_quantization(options: ExportOptions) -> None:
    if options.quantize is None:
        if options.parity_data is not None:
            raise ExportError(
                "--parity-data measures an int8 bundle's agreement with the float model; add --quantize int8, or drop --parity-data"
            )
        return
    if options.quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize {options.quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    if options.fp16 or options.tensorrt:
        raise ExportError(
            "--quantize int8 quantizes onnxruntime CPU graphs; it does not combine with --fp16 or --tensorrt. Drop one of them"
        )
    if not 0 <= options.min_agreement <= 1:
        raise ExportError(
            f"--min-agreement {options.min_agreement} must lie between 0 and 1, e.g. {DEFAULT_MIN_AGREEMENT}"
        )
    if options.parity_data is not None and not Path(options.parity_data).exists():
        raise ExportError(f"--parity-data {options.parity_data}: no such file or directory")


def export_bundle(
    model_dir: str | Path, output_dir: str | Path | None = None, options: ExportOptions = ExportOptions()
) -> ExportResult:
    """Export `model_dir` (written by pcee-train) to a verified bundle at `output_dir` (default: MODEL_DIR-pcee)."""
    started = time.perf_counter()
    check_opset(options.opset)
    if options.max_batch_size < 1:
        raise ExportError(f"--max-batch-size {options.max_batch_size} must be at least 1")
    check_task_type(options.task_type)
    check_quantization(options)
    if options.tensorrt:
        require_tensorrt()
    model_dir = Path(model_dir)
    output_dir = Path(output_dir) if output_dir is not None else default_bundle_dir(model_dir)
    check_output_dir(output_dir)
    remove_stale_debris(output_dir)
    with staging_directory(output_dir) as staging:
        manifest = write_bundle(model_dir, staging, options)
        replace_directory(staging, output_dir)
    return ExportResult(output_dir, manifest, time.perf_counter() - started, bundle_file_sizes(output_dir))
