"""Write a Triton model repository entry for a bundle: `config.pbtxt`, `1/model.py` and `1/bundle/`.

The config is plain stock-Triton text (Python backend, dynamic batching, instance groups), so the
same directory runs under the `tritonserver` binary of the nvidia-pytriton wheel and in NVIDIA's
Triton container. The bundle is copied file by file from what its manifest lists, and the copy is
checked against the manifest's hashes before the directory is moved into place.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pcee.runtime import (
    BACKEND_NAMES,
    MANIFEST_NAME,
    Manifest,
    replace_directory,
    staging_directory_for,
)

from .errors import DeployError

VERSION = "1"
BUNDLE_FOLDER = "bundle"
MODEL_FILE = "model.py"
CONFIG_FILE = "config.pbtxt"
WRITTEN_BY = "# written by pcee-triton"
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
DEFAULT_RUNTIME_BACKEND = {"cpu": "onnxruntime-cpu", "gpu": "auto"}
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The keys of the config's `parameters`, which triton_model.py reads at load.
POINT_PARAMETER, BACKEND_PARAMETER, THREADS_PARAMETER = (
    "operating_point",
    "runtime_backend",
    "intra_op_threads",
)


@dataclass(frozen=True)
class TritonOptions:
    """How the bundle is served by Triton; every field becomes part of `config.pbtxt`.

    model_name: the model's name in Triton (default: the bundle's task, else its folder name).
    max_batch_size: the most rows one `execute` call gets (Triton's dynamic batcher sums request rows).
    max_queue_delay_us: how long the batcher waits for more requests before it runs a batch.
    preferred_batch_sizes: batch sizes the batcher runs at once when it has them queued.
    instances / kind: how many model instances (processes) and where ("cpu" or "gpu").
    runtime_backend: the pcee runtime backend (default onnxruntime-cpu on CPU; auto on GPU, which
        takes TensorRT engines when the bundle has them, else onnxruntime CUDA).
    operating_point: the saved point served when a request names none (default: the manifest's).
    intra_op_threads: onnxruntime threads per graph session (default: one per core).
    """

    model_name: str | None = None
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    kind: str = "cpu"
    runtime_backend: str | None = None
    operating_point: str | None = None
    intra_op_threads: int | None = None

    def check(self) -> None:
        if self.kind not in KINDS:
            raise DeployError(f"instance kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.runtime_backend is not None and self.runtime_backend not in BACKEND_NAMES:
            raise DeployError(
                f"unknown runtime backend {self.runtime_backend!r}; choose one of {', '.join(BACKEND_NAMES)}"
            )
        for name in ("max_batch_size", "instances"):
            require_at_least(name, getattr(self, name), 1)
        require_at_least("max_queue_delay_us", self.max_queue_delay_us, 0)
        if self.intra_op_threads is not None:
            require_at_least("intra_op_threads", self.intra_op_threads, 1)
        for size in self.preferred_batch_sizes:
            require_at_least("a preferred batch size", size, 1)
            if size > self.max_batch_size:
                raise DeployError(
                    f"preferred batch size {size} is larger than max_batch_size {self.max_batch_size}; "
                    "lower it or raise --max-batch-size"
                )
        if self.model_name is not None and not MODEL_NAME_PATTERN.fullmatch(self.model_name):
            raise DeployError(
                f"model name {self.model_name!r} is not a usable folder and URL name; use letters, digits, '_', '-' and '.'"
            )

    @property
    def backend_for_kind(self) -> str:
        return self.runtime_backend or DEFAULT_RUNTIME_BACKEND[self.kind]


def require_at_least(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DeployError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class TritonRepository:
    """What `write_triton_repository` wrote, for the CLI's report."""

    repository: Path
    model_name: str
    model_dir: Path
    inputs: list[str]
    num_labels: int
    operating_point: str
    saved_points: list[str]
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {key: str(value) if isinstance(value, Path) else value for key, value in data.items()}


def write_triton_repository(
    bundle_dir: str | Path, repository: str | Path, options: TritonOptions = TritonOptions()
) -> TritonRepository:
    """Write `repository/<model name>/` for `bundle_dir`; an earlier pcee-triton entry of that name is replaced."""
    options.check()
    bundle_dir, repository = Path(bundle_dir), Path(repository)
    manifest = Manifest.load(bundle_dir, verify_hashes=True)
    name = options.model_name or default_model_name(manifest, bundle_dir)
    point = served_point(manifest, options.operating_point)
    model_dir = repository / name
    refuse_foreign_directory(model_dir)
    staging = staging_directory_for(model_dir)
    try:
        copy_bundle(bundle_dir, manifest, staging / VERSION / BUNDLE_FOLDER)
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), staging / VERSION / MODEL_FILE)
        (staging / CONFIG_FILE).write_text(model_config(name, manifest, options, point))
        replace_directory(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TritonRepository(
        repository=repository,
        model_name=name,
        model_dir=model_dir,
        inputs=input_names(manifest),
        num_labels=manifest.model.num_labels,
        operating_point=point,
        saved_points=[saved.name for saved in manifest.operating_points],
        options={**asdict(options), "runtime_backend": options.backend_for_kind},
    )


def default_model_name(manifest: Manifest, bundle_dir: Path) -> str:
    candidate = manifest.model.task or bundle_dir.resolve().name
    return re.sub(r"[^A-Za-z0-9_.-]", "-", candidate).lstrip(".-_") or "pcee"


def served_point(manifest: Manifest, requested: str | None) -> str:
    """The name of the default point: the requested saved point, else the manifest's own."""
    if requested is None:
        return manifest.operating_point.name or ""
    if manifest.saved_point(requested) is None:
        names = [saved.name for saved in manifest.operating_points]
        raise DeployError(
            f"the bundle has no saved operating point named {requested!r}; saved points: {names} "
            "(pcee-calibrate saves points under a name)"
        )
    return requested


def refuse_foreign_directory(model_dir: Path) -> None:
    """Replace only what pcee-triton wrote: another model's folder of the same name stays untouched."""
    config = model_dir / CONFIG_FILE
    if model_dir.exists() and not (config.is_file() and config.read_text().startswith(WRITTEN_BY)):
        raise DeployError(
            f"{model_dir} exists and was not written by pcee-triton; pick another --model-name or remove it"
        )


def copy_bundle(bundle_dir: Path, manifest: Manifest, target: Path) -> None:
    """The manifest and every file it lists (graphs, tokenizer, engines), then the copy's hashes checked."""
    target.mkdir(parents=True)
    for relative in [MANIFEST_NAME, *(entry.file for entry in manifest.listed_files())]:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle_dir / relative, destination)
    Manifest.load(target, verify_hashes=True)


def input_names(manifest: Manifest) -> list[str]:
    return ["text", "text_pair"] if manifest.model.task_type == "sentence_pair" else ["text"]


def model_config(name: str, manifest: Manifest, options: TritonOptions, point: str) -> str:
    """config.pbtxt: every row is one batch element, so clients send [rows, 1] and Triton batches rows."""
    inputs = [tensor(name_, "TYPE_STRING", [1]) for name_ in input_names(manifest)]
    outputs = [
        tensor("label", "TYPE_STRING", [1]),
        tensor("probabilities", "TYPE_FP32", [manifest.model.num_labels]),
        tensor("exit_layer", "TYPE_INT32", [1]),
    ]
    parameters = {POINT_PARAMETER: point, BACKEND_PARAMETER: options.backend_for_kind}
    if options.intra_op_threads is not None:
        parameters[THREADS_PARAMETER] = str(options.intra_op_threads)
    preferred = "".join(f"\n  preferred_batch_size: {size}" for size in options.preferred_batch_sizes)
    lines = [
        f"{WRITTEN_BY} from {manifest.model.architecture} bundle, {manifest.model.num_layers} layers",
        f"name: {quoted(name)}",
        'backend: "python"',
        f"max_batch_size: {options.max_batch_size}",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.max_queue_delay_us}{preferred}\n}}",
        f"instance_group [\n  {{ count: {options.instances} kind: {KINDS[options.kind]} }}\n]",
        *(
            f"parameters {{ key: {quoted(key)} value: {{ string_value: {quoted(value)} }} }}"
            for key, value in parameters.items()
        ),
    ]
    return "\n".join(lines) + "\n"


def tensor(name: str, data_type: str, dims: list[int]) -> str:
    return f"  {{ name: {quoted(name)} data_type: {data_type} dims: [ {', '.join(map(str, dims))} ] }}"


def quoted(text: str) -> str:
    """A protobuf text-format string: JSON's escaping is a subset it reads."""
    return json.dumps(text, ensure_ascii=False)
