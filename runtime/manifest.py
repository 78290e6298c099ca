"""The bundle manifest: the one contract between exporter, runtime and calibration.

`Manifest.load(bundle_dir)` validates the format version, that every file is present, and
(by default) every file's sha256, so a broken bundle fails at load time, never mid-request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_file_atomically
from .errors import BundleError
from .graphs import GraphSpec, spec_from_dict

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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
class GraphFile:
    """One graph (or engine) file of the bundle, relative to the bundle directory."""

    file: str
    sha256: str
    spec: GraphSpec

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, **self.spec.to_dict()}

    @classmethod
    def from_dict(cls, kind: str, data: dict) -> "GraphFile":
        return cls(data["file"], data["sha256"], spec_from_dict(kind, data))


@dataclass
class ModelInfo:
    architecture: str
    num_layers: int
    hidden_size: int
    labels: list[str]
    max_seq_len: int
    uses_token_type_ids: bool
    exit_pooling: str
    learned_confidence: bool
    task: str | None = None
    task_type: str = "single_sentence"  # or "sentence_pair"
    metric: str = "accuracy"
    precision: str = "fp32"

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclass
class Manifest:
    model: ModelInfo
    tokenizer_files: list[str]
    embeddings: GraphFile
    layers: list[GraphFile]
    parity: dict
    operating_point: dict
    operating_points: list[dict] = field(default_factory=list)
    full_graph: GraphFile | None = None
    tensorrt: dict | None = None
    calibration: dict | None = None
    format_version: int = FORMAT_VERSION
    producer: str = "pcee"

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {
            "format_version": self.format_version,
            "producer": self.producer,
            "model": {**self.model.__dict__, "num_labels": self.model.num_labels},
            "tokenizer": {"files": self.tokenizer_files},
            "graphs": {
                "embeddings": self.embeddings.to_dict(),
                "layers": [layer.to_dict() for layer in self.layers],
            },
            "parity": self.parity,
            "operating_point": self.operating_point,
            "operating_points": self.operating_points,
        }
        if self.full_graph is not None:
            data["graphs"]["full"] = self.full_graph.to_dict()
        for name in ("tensorrt", "calibration"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> "Manifest":
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise BundleError(
                f"{source}: format_version {version!r} is not supported (this pcee reads version {FORMAT_VERSION}); "
                "re-export the bundle with this pcee version, or upgrade pcee"
            )
        try:
            model = dict(data["model"])
            model.pop("num_labels", None)
            graphs = data["graphs"]
            return cls(
                model=ModelInfo(**model),
                tokenizer_files=list(data["tokenizer"]["files"]),
                embeddings=GraphFile.from_dict("embeddings", graphs["embeddings"]),
                layers=[GraphFile.from_dict("layer", layer) for layer in graphs["layers"]],
                full_graph=GraphFile.from_dict("full", graphs["full"]) if "full" in graphs else None,
                parity=data.get("parity", {}),
                operating_point=data["operating_point"],
                operating_points=data.get("operating_points", []),
                tensorrt=data.get("tensorrt"),
                calibration=data.get("calibration"),
                format_version=version,
                producer=data.get("producer", "pcee"),
            )
        except (KeyError, TypeError) as error:
            raise BundleError(f"{source}: malformed manifest ({type(error).__name__}: {error}); re-export the bundle") from None

    @classmethod
    def load(cls, bundle_dir: str | Path, verify_hashes: bool = True) -> "Manifest":
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is not a pcee bundle: no {MANIFEST_NAME}; create one with pcee-export MODEL_DIR")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BundleError(f"{path} is not valid JSON ({error}); re-export the bundle") from None
        if not isinstance(data, dict):
            raise BundleError(f"{path} holds {type(data).__name__}, expected a JSON object; re-export the bundle")
        manifest = cls.from_dict(data, str(path))
        manifest.check_files(bundle_dir, verify_hashes)
        return manifest

    def save(self, bundle_dir: str | Path) -> None:
        write_json_atomically(Path(bundle_dir) / MANIFEST_NAME, self.to_dict())

    # -- integrity ---------------------------------------------------------------------------------
    def graph_files(self) -> list[GraphFile]:
        files = [self.embeddings, *self.layers]
        return files + ([self.full_graph] if self.full_graph else [])

    def engine_files(self) -> list[dict]:
        if not self.tensorrt:
            return []
        engines = self.tensorrt["engines"]
        return [engines["embeddings"], *engines["layers"]]

    def check_files(self, bundle_dir: Path, verify_hashes: bool) -> None:
        for tokenizer_file in self.tokenizer_files:
            require_file(bundle_dir, tokenizer_file)
        if len(self.layers) != self.model.num_layers:
            raise BundleError(f"manifest lists {len(self.layers)} layer graphs for a {self.model.num_layers}-layer model; re-export the bundle")
        for entry in [*(g.__dict__ for g in self.graph_files()), *self.engine_files()]:
            path = require_file(bundle_dir, entry["file"])
            if verify_hashes and sha256_of(path) != entry["sha256"]:
                raise BundleError(
                    f"{path}: sha256 does not match the manifest (file changed or corrupted since export); re-export the bundle"
                )


def require_file(bundle_dir: Path, relative: str) -> Path:
    path = bundle_dir / relative
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir} is missing {relative} listed in its manifest; re-export the bundle")
    return path
