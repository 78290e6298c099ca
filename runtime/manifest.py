"""The bundle manifest: the one contract between exporter, runtime and calibration.

`Manifest.load(bundle_dir)` checks the format version, every field's type and range, that every
listed file lies inside the bundle and is present, and (by default) every file's sha256, so a
broken bundle fails at load time, never mid-request. The backends then check each graph against
its spec when they open it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .atomic import write_file_atomically
from .errors import BundleError, PceeError
from .graphs import (
    EMBEDDINGS_GRAPH,
    FULL_GRAPH,
    EngineChain,
    GraphChain,
    GraphSpec,
    LocatedGraph,
    embeddings_spec,
    layer_graph_name,
    layer_spec,
    spec_from_dict,
)
from .layout import MANIFEST_LOCK, MANIFEST_NAME
from .policies import OperatingPoint

FORMAT_VERSION = 2
INITIAL_POINT_NAME = "initial"  # what a merge names an unnamed current point it keeps
REEXPORT = "re-export the bundle with pcee-export"
TASK_TYPES = ("single_sentence", "sentence_pair")
PRECISIONS = ("fp32", "fp16", "int8")
EXIT_POOLINGS = ("cls", "mean")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomically(path: Path, data: dict) -> None:
    payload = (json.dumps(data, indent=2) + "\n").encode()
    write_file_atomically(Path(path), lambda handle: handle.write(payload))


@dataclass
class FileEntry:
    """A file of the bundle (tokenizer file, engine), relative to the bundle directory, with its sha256."""

    file: str
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict) -> FileEntry:
        return cls(data["file"], data["sha256"])

    @classmethod
    def of(cls, bundle_dir: Path, relative: str) -> FileEntry:
        return cls(relative, sha256_of(bundle_dir / relative))


@dataclass
class GraphFile(FileEntry):
    """One ONNX graph of the bundle, its declared inputs and outputs, and its onnxruntime contrib operators."""

    spec: GraphSpec
    # Fused (Attention, BiasGelu) and quantized (QAttention, MatMulInteger) operators by name; empty for a portable graph.
    fused_operators: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), **self.spec.to_dict(), "fused_operators": self.fused_operators}

    @classmethod
    def from_dict(cls, kind: str, data: dict) -> GraphFile:
        fused = data.get("fused_operators", {})
        if not isinstance(fused, dict) or not all(
            isinstance(count, int) and not isinstance(count, bool) for count in fused.values()
        ):
            raise BundleError(
                f"graph {data['file']}: fused_operators must map operator names to counts, got {fused!r:.200}"
            )
        return cls(data["file"], data["sha256"], spec_from_dict(kind, data), dict(fused))

    def located(self, bundle_dir: Path, name: str) -> LocatedGraph:
        return LocatedGraph(name, bundle_dir / self.file, self.spec)


@dataclass
class ModelInfo:
    architecture: str
    num_layers: int
    hidden_size: int
    labels: list[str]
    max_seq_len: int
    vocab_size: int
    uses_token_type_ids: bool
    exit_pooling: str
    learned_confidence: bool
    task: str | None = None
    task_type: str = "single_sentence"
    metric: str = "accuracy"
    precision: str = "fp32"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def check(self) -> None:
        """Every field's type and range: a manifest edited by hand fails here, not at predict time."""
        for name in ("num_layers", "hidden_size", "max_seq_len", "vocab_size"):
            require_positive_integer(f"model.{name}", getattr(self, name))
        for name in ("uses_token_type_ids", "learned_confidence"):
            if not isinstance(getattr(self, name), bool):
                raise BundleError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("architecture", "metric"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise BundleError(f"model.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.task is not None and not isinstance(self.task, str):
            raise BundleError(f"model.task must be a string or null, got {self.task!r}")
        check_labels(self.labels)
        for name, allowed in (
            ("task_type", TASK_TYPES),
            ("precision", PRECISIONS),
            ("exit_pooling", EXIT_POOLINGS),
        ):
            if getattr(self, name) not in allowed:
                raise BundleError(
                    f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )


def require_positive_integer(field_name: str, value, advice: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BundleError(f"{field_name} must be a positive integer, got {value!r}{advice}")


def check_labels(labels) -> None:
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(label, str) and label for label in labels)
    ):
        raise BundleError(
            f"model.labels must be a list of at least two non-empty label names, got {labels!r:.200}"
        )
    if len(set(labels)) != len(labels):
        raise BundleError(f"model.labels has duplicate names: {labels}")


@dataclass
class TokenizerInfo:
    """The tokenizer files; the first is the tokenizers-library JSON the runtime loads."""

    files: list[FileEntry]
    built_from: str | None = (
        None  # "vocab.txt" when pcee-export built tokenizer.json from a WordPiece vocabulary
    )

    def to_dict(self) -> dict:
        return {"files": [entry.to_dict() for entry in self.files], "built_from": self.built_from}

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerInfo:
        files = [FileEntry.from_dict(entry) for entry in data["files"]]
        if not files:
            raise BundleError(f"the manifest lists no tokenizer files; {REEXPORT}")
        return cls(files, data.get("built_from"))


@dataclass
class ParityResult:
    """How closely the exported graphs reproduced the PyTorch model at export time."""

    tolerance: float
    batch_sizes: list[int]
    sequence_lengths: list[int]
    max_abs_diff: dict[str, dict[str, float]]  # graph name -> output name -> max |diff| over all batches
    passed: bool
    backends: list[str] = field(
        default_factory=lambda: ["onnxruntime"]
    )  # the runtime backends that were checked

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ParityResult:
        return cls(**data)


@dataclass
class QuantizationResult:
    """How an int8 bundle's layer graphs were quantized, and how often they still agree with the float model.

    Per exit (layer 1 first): the share of rows whose predicted label matches the float PyTorch model's,
    and, where labelled data was given, the accuracy of each. The export failed unless the last exit's
    agreement reached `min_agreement`.
    """

    method: str  # "dynamic": weights quantized ahead, activations at run time
    weight_type: str  # "int8"
    operators: list[str]  # the operator types whose weights were quantized
    float_exit_heads: bool
    min_agreement: float
    rows: int
    agreement: list[float]
    accuracy: list[float] | None = None
    float_accuracy: list[float] | None = None
    parity_data: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantizationResult:
        return cls(**data)


@dataclass
class TensorRTEngines:
    """The TensorRT block: one engine per graph, and what they were built for."""

    version: str
    gpu: str
    fp16: bool
    max_batch_size: int
    max_seq_len: int
    embeddings: FileEntry
    layers: list[FileEntry]
    timing_cache: str | None = None

    def files(self) -> list[FileEntry]:
        return [self.embeddings, *self.layers]

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "gpu": self.gpu,
            "fp16": self.fp16,
            "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len,
            "timing_cache": self.timing_cache,
            "engines": {
                "embeddings": self.embeddings.to_dict(),
                "layers": [entry.to_dict() for entry in self.layers],
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> TensorRTEngines:
        engines = data["engines"]
        block = cls(
            data["version"],
            data["gpu"],
            data["fp16"],
            data["max_batch_size"],
            data["max_seq_len"],
            FileEntry.from_dict(engines["embeddings"]),
            [FileEntry.from_dict(entry) for entry in engines["layers"]],
            data.get("timing_cache"),
        )
        for name in ("max_batch_size", "max_seq_len"):
            require_positive_integer(
                f"tensorrt.{name}", getattr(block, name), "; rebuild with pcee-export --tensorrt"
            )
        return block


@dataclass
class Manifest:
    model: ModelInfo
    tokenizer: TokenizerInfo
    embeddings: GraphFile
    layers: list[GraphFile]
    parity: ParityResult
    operating_point: OperatingPoint
    operating_points: list[OperatingPoint] = field(default_factory=list)
    full_graph: GraphFile | None = None
    tensorrt: TensorRTEngines | None = None
    quantization: QuantizationResult | None = None
    calibration: dict | None = None  # the last calibration's summary, as pcee-calibrate wrote it
    format_version: int = FORMAT_VERSION
    producer: str = "pcee"

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        graphs = {
            "embeddings": self.embeddings.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.full_graph is not None:
            graphs["full"] = self.full_graph.to_dict()
        data = {
            "format_version": self.format_version,
            "producer": self.producer,
            "model": {**asdict(self.model), "num_labels": self.model.num_labels},
            "tokenizer": self.tokenizer.to_dict(),
            "graphs": graphs,
            "parity": self.parity.to_dict(),
            "operating_point": self.operating_point.to_dict(),
            "operating_points": [point.to_dict() for point in self.operating_points],
        }
        if self.tensorrt is not None:
            data["tensorrt"] = self.tensorrt.to_dict()
        if self.quantization is not None:
            data["quantization"] = self.quantization.to_dict()
        if self.calibration is not None:
            data["calibration"] = self.calibration
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> Manifest:
        version = data.get("format_version")
        if not isinstance(version, int) or version != FORMAT_VERSION:
            raise BundleError(
                f"{source}: format_version {version!r} is not supported (this pcee reads version {FORMAT_VERSION}); "
                f"{REEXPORT} of this pcee version, or install the pcee version that wrote it"
            )
        try:
            manifest = cls.parse(data, version)
        except PceeError as error:
            raise BundleError(f"{source}: {error}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise BundleError(
                f"{source}: malformed manifest ({type(error).__name__}: {error}); {REEXPORT}"
            ) from None
        manifest.check()
        return manifest

    @classmethod
    def parse(cls, data: dict, version: int) -> Manifest:
        model = dict(data["model"])
        declared_labels = model.pop("num_labels", None)
        graphs = data["graphs"]
        manifest = cls(
            model=ModelInfo(**model),
            tokenizer=TokenizerInfo.from_dict(data["tokenizer"]),
            embeddings=GraphFile.from_dict("embeddings", graphs["embeddings"]),
            layers=[GraphFile.from_dict("layer", layer) for layer in graphs["layers"]],
            full_graph=GraphFile.from_dict("full", graphs["full"]) if "full" in graphs else None,
            parity=ParityResult.from_dict(data["parity"]),
            operating_point=OperatingPoint.from_dict(data["operating_point"]),
            operating_points=[OperatingPoint.from_dict(point) for point in data.get("operating_points", [])],
            tensorrt=TensorRTEngines.from_dict(data["tensorrt"]) if data.get("tensorrt") else None,
            quantization=QuantizationResult.from_dict(data["quantization"])
            if data.get("quantization")
            else None,
            calibration=data.get("calibration"),
            format_version=version,
            producer=data.get("producer", "pcee"),
        )
        if declared_labels is not None and declared_labels != len(model["labels"]):
            raise BundleError(
                f"model.num_labels is {declared_labels!r} but model.labels lists {len(model['labels'])} names"
            )
        return manifest

    @classmethod
    def load(cls, bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(not_a_bundle(bundle_dir))
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BundleError(f"{path} is not valid JSON ({error}); {REEXPORT}") from None
        except RecursionError:
            raise BundleError(f"{path} nests JSON too deeply to be a pcee manifest; {REEXPORT}") from None
        if not isinstance(data, dict):
            raise BundleError(f"{path} holds {type(data).__name__}, expected a JSON object; {REEXPORT}")
        manifest = cls.from_dict(data, str(path))
        manifest.check_files(bundle_dir, verify_hashes)
        return manifest

    def save(self, bundle_dir: str | Path) -> None:
        write_json_atomically(Path(bundle_dir) / MANIFEST_NAME, self.to_dict())

    # -- what the backends are built from ----------------------------------------------------------
    def graph_chain(self, bundle_dir: Path) -> GraphChain:
        return graph_chain_of(bundle_dir, self.embeddings, self.layers, self.full_graph)

    def engine_chain(self, bundle_dir: Path) -> EngineChain | None:
        engines = self.tensorrt
        if engines is None:
            return None
        return EngineChain(
            bundle_dir / engines.embeddings.file,
            tuple(bundle_dir / entry.file for entry in engines.layers),
            engines.max_batch_size,
            engines.max_seq_len,
            f"TensorRT {engines.version} on {engines.gpu}",
        )

    def saved_point(self, name: str) -> OperatingPoint | None:
        return next((point for point in self.operating_points if point.name == name), None)

    # -- integrity ---------------------------------------------------------------------------------
    def graph_files(self) -> list[GraphFile]:
        files = [self.embeddings, *self.layers]
        return files + ([self.full_graph] if self.full_graph else [])

    def listed_files(self) -> list[FileEntry]:
        """Every file the manifest lists with a hash."""
        engines = self.tensorrt.files() if self.tensorrt else []
        return [*self.tokenizer.files, *self.graph_files(), *engines]

    def check(self) -> None:
        """Cross-checks between fields that the graphs' specs and the model facts must agree on."""
        self.model.check()
        if (self.model.precision == "int8") != (self.quantization is not None):
            raise BundleError(
                f"model.precision is {self.model.precision} but the quantization block is {'absent' if self.quantization is None else 'present'}; {REEXPORT}"
            )
        if len(self.layers) != self.model.num_layers:
            raise BundleError(
                f"manifest lists {len(self.layers)} layer graphs for a {self.model.num_layers}-layer model; {REEXPORT}"
            )
        if self.tensorrt is not None and len(self.tensorrt.layers) != self.model.num_layers:
            raise BundleError(
                f"manifest lists {len(self.tensorrt.layers)} TensorRT layer engines for {self.model.num_layers} layers; rebuild with pcee-export --tensorrt"
            )
        model = self.model
        expected = {
            EMBEDDINGS_GRAPH: (
                self.embeddings,
                embeddings_spec(model.uses_token_type_ids, model.hidden_size),
            ),
            **{
                layer_graph_name(index): (
                    layer,
                    layer_spec(model.hidden_size, model.num_labels, model.learned_confidence),
                )
                for index, layer in enumerate(self.layers)
            },
        }
        for name, (graph, spec) in expected.items():
            if graph.spec != spec:
                raise BundleError(
                    f"the manifest's spec of {name} ({graph.file}) does not fit the model facts "
                    f"(hidden size {model.hidden_size}, {model.num_labels} labels): declared {graph.spec.to_dict()}, "
                    f"expected {spec.to_dict()}; {REEXPORT}"
                )

    def check_files(self, bundle_dir: Path, verify_hashes: bool) -> None:
        for entry in self.listed_files():
            path = require_file(bundle_dir, entry.file)
            if verify_hashes and sha256_of(path) != entry.sha256:
                raise BundleError(
                    f"{path}: sha256 does not match the manifest (file changed or corrupted since export); {REEXPORT}"
                )


def graph_chain_of(
    bundle_dir: Path, embeddings: GraphFile, layers: list[GraphFile], full: GraphFile | None = None
) -> GraphChain:
    """The chain a backend runs, from graph entries (the exporter's, before its manifest exists)."""
    return GraphChain(
        embeddings.located(bundle_dir, EMBEDDINGS_GRAPH),
        tuple(layer.located(bundle_dir, layer_graph_name(index)) for index, layer in enumerate(layers)),
        None if full is None else full.located(bundle_dir, FULL_GRAPH),
    )


def require_file(bundle_dir: Path, relative) -> Path:
    """The path of a file the manifest lists, which must lie inside the bundle and be a non-empty file."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise BundleError(
            f"manifest path {relative!r} must be a path relative to the bundle directory; {REEXPORT}"
        )
    root = bundle_dir.resolve()
    path = (bundle_dir / relative).resolve()
    if not path.is_relative_to(root):
        raise BundleError(
            f"manifest path {relative!r} points outside the bundle {bundle_dir}; refusing to open it. {REEXPORT}"
        )
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir} is missing {relative} listed in its manifest; {REEXPORT}")
    if path.stat().st_size == 0:
        raise BundleError(f"bundle {bundle_dir}: {relative} is empty; {REEXPORT}")
    return path


def not_a_bundle(bundle_dir: Path) -> str:
    """Why `bundle_dir` holds no manifest, and what to pass instead: the bundle exported next to a model
    directory (pcee-export's default output, MODEL_DIR-pcee) when there is one."""
    if not bundle_dir.exists():
        return f"{bundle_dir} does not exist; pass a bundle directory (pcee-export MODEL_DIR writes one to MODEL_DIR-pcee)"
    if (bundle_dir / "config.json").is_file():
        exported = bundle_dir.with_name(f"{bundle_dir.name}-pcee")
        if (exported / MANIFEST_NAME).is_file():
            return f"{bundle_dir} is a model directory, not a bundle; its exported bundle is {exported}: pass that"
        return f"{bundle_dir} is a model directory, not a bundle; export it first: pcee-export {bundle_dir}"
    return f"{bundle_dir} is not a pcee bundle: no {MANIFEST_NAME}; create one with pcee-export MODEL_DIR"


# -- the one read-merge-write of a bundle's manifest -------------------------------------------------
def merged_points(
    current: OperatingPoint, saved: list[OperatingPoint], new: OperatingPoint
) -> list[OperatingPoint]:
    """The saved points with `new` added (replacing a namesake), and the current point kept under a name."""
    points = [point for point in saved if point.name != new.name]
    if current not in saved and current.name != new.name:
        points.append(current if current.name else replace(current, name=INITIAL_POINT_NAME))
    return points + [new]


def record_operating_point(bundle_dir: str | Path, point: OperatingPoint, calibration: dict) -> Manifest:
    """Make `point` the bundle's operating point, keep the earlier ones by name, in one atomic write.

    `calibration` (the summary of the calibration that chose the point) replaces the manifest's. The
    read-merge-write holds the bundle's manifest lock, so concurrent writers all keep their points.
    """
    with manifest_lock(bundle_dir):
        manifest = Manifest.load(bundle_dir, verify_hashes=False)
        manifest.operating_points = merged_points(manifest.operating_point, manifest.operating_points, point)
        manifest.operating_point = point
        manifest.calibration = calibration
        manifest.save(bundle_dir)
    return manifest


@contextmanager
def manifest_lock(bundle_dir: str | Path) -> Iterator[None]:
    """An exclusive lock between processes (flock on BUNDLE/.manifest.lock), released when the file closes,
    also when the process dies."""
    import fcntl  # POSIX only: imported here so that the runtime itself still loads elsewhere

    with open(Path(bundle_dir) / MANIFEST_LOCK, "ab") as lock_file:  # "a": create it, never truncate it
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield
