"""Build one TensorRT engine per ONNX graph of a bundle, with the TensorRT 10.1+ and 11 Python API.

Each engine gets one optimization profile covering batch 1..max_batch_size and sequence
1..max_seq_len. Networks are strongly typed: the ONNX graph's own dtypes (float32, or the half
layers of an --fp16 export) decide the precision, as TensorRT 11 requires (it removed the FP16 and
INT8 builder flags). All builds share one timing cache, which starts from the one the last build
on this machine left (per TensorRT version and GPU) and is saved there and into the bundle's trt/.
Every boolean or None that TensorRT returns is checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pcee.runtime import (
    BATCH,
    ENGINE_DIR,
    SEQUENCE,
    TIMING_CACHE_NAME,
    FileEntry,
    GraphFile,
    GraphSpec,
    TensorRTEngines,
    TensorSpec,
    engine_file,
    tensorrt_version_problem,
    write_file_atomically,
)

from .errors import EngineBuildError, TensorRTUnavailableError

Shape = tuple[int, ...]


def require_tensorrt() -> None:
    """Fail before any work when --tensorrt cannot run here, naming each missing piece."""
    missing = []
    try:
        import tensorrt
    except ImportError:
        missing.append("the tensorrt Python package (pip install 'pcee[gpu]')")
    else:
        if (version_problem := tensorrt_version_problem(tensorrt.__version__)) is not None:
            missing.append(version_problem)
    if gpu_name() is None:
        missing.append("an NVIDIA GPU (no CUDA device was found)")
    if missing:
        raise TensorRTUnavailableError(
            f"--tensorrt needs {' and '.join(missing)}. Export without --tensorrt to get the ONNX bundle, "
            "or run pcee-export on the GPU machine that will serve the engines."
        )


def gpu_name() -> str | None:
    return cuda_device_name() or nvidia_smi_gpu_name()


def cuda_device_name() -> str | None:
    """Name of CUDA device 0 through cuda-python (12.6 or newer), or None when cuda-python or a device is missing."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    try:
        error, count = cudart.cudaGetDeviceCount()
        if error != cudart.cudaError_t.cudaSuccess or count < 1:
            return None
        error, properties = cudart.cudaGetDeviceProperties(0)
    except (RuntimeError, OSError):  # no driver library to load
        return None
    if error != cudart.cudaError_t.cudaSuccess:
        return None
    return bytes(properties.name).split(b"\0", 1)[0].decode(errors="replace")


def nvidia_smi_gpu_name() -> str | None:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        result = subprocess.run(
            [executable, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = result.stdout.strip().splitlines()
    return names[0].strip() if result.returncode == 0 and names else None


@dataclass(frozen=True)
class ShapeRange:
    """The dynamic axes' range every engine is built for; opt sits in the middle of each range."""

    max_batch_size: int
    max_seq_len: int

    def profile_shapes(self, tensor: TensorSpec) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) shape of one input, e.g. attention_bias [B,1,1,S] -> ((1,1,1,1), (16,1,1,64), (32,1,1,128))."""
        ranges = {BATCH: self.max_batch_size, SEQUENCE: self.max_seq_len}
        minimum = tuple(1 if dim in ranges else dim for dim in tensor.shape)
        optimum = tuple(max(1, ranges[dim] // 2) if dim in ranges else dim for dim in tensor.shape)
        maximum = tuple(ranges.get(dim, dim) for dim in tensor.shape)
        return minimum, optimum, maximum


def machine_timing_cache(version: str, gpu: str) -> Path:
    """Where builds on this machine keep their timing cache: $XDG_CACHE_HOME/pcee/tensorrt (else ~/.cache), per TensorRT version and GPU."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "pcee" / "tensorrt" / f"timing-{version}-{re.sub(r'[^A-Za-z0-9.]+', '_', gpu)}.cache"


def tensorrt_major(trt) -> int:
    return int(trt.__version__.split(".", 1)[0])


class EngineBuilder:
    """One TensorRT builder and timing cache shared by all of a bundle's engines.

    The timing cache starts from `timing_cache` when a file is there (an earlier build's), so
    tactics timed then are not timed again.
    """

    def __init__(self, shape_range: ShapeRange, timing_cache: Path):
        import tensorrt as trt

        self.trt = trt
        self.shape_range = shape_range
        self.timing_cache_path = timing_cache
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        if self.builder is None:
            raise EngineBuildError(
                "TensorRT could not create a builder (is the GPU visible to this process?)"
            )
        self.timing_cache = self.load_timing_cache()

    def load_timing_cache(self):
        config = self.builder.create_builder_config()
        saved = self.timing_cache_path.read_bytes() if self.timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(saved)
        if cache is None and saved:
            warnings.warn(
                f"TensorRT could not read the timing cache {self.timing_cache_path} (another TensorRT version's?); "
                "timing every tactic again, and replacing it after the build",
                RuntimeWarning,
                stacklevel=3,
            )
            cache = config.create_timing_cache(b"")
        if cache is None:
            raise EngineBuildError("TensorRT could not create a timing cache")
        return cache

    def network_flags(self) -> int:
        # TensorRT 11 builds only strongly typed networks (the flag is deprecated there); 10 must be asked.
        if tensorrt_major(self.trt) >= 11:
            return 0
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def parse(self, onnx_path: Path):
        network = self.builder.create_network(self.network_flags())
        parser = self.trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'no parser message'}")
        return network, parser  # the parser owns weights the network refers to: keep both alive

    def config_for(self, spec: GraphSpec):
        config = self.builder.create_builder_config()
        profile = self.builder.create_optimization_profile()
        for tensor in spec.inputs:
            profile.set_shape(tensor.name, *self.shape_range.profile_shapes(tensor))
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(
                f"TensorRT rejected the optimization profile for {spec.kind} graph inputs {spec.input_names}"
            )
        if not config.set_timing_cache(self.timing_cache, False):
            raise EngineBuildError("TensorRT refused the shared timing cache")
        return config

    def build(self, onnx_path: Path, spec: GraphSpec, engine_path: Path) -> None:
        network, _parser = self.parse(onnx_path)
        serialized = self.builder.build_serialized_network(network, self.config_for(spec))
        if serialized is None:
            raise EngineBuildError(
                f"TensorRT failed to build an engine from {onnx_path.name}; its log above says why"
            )
        engine_path.write_bytes(memoryview(serialized))

    def save_timing_cache(self, bundle_copy: Path) -> None:
        """Write the cache into the bundle, and back where the next build on this machine starts from."""
        serialized = self.timing_cache.serialize()
        if serialized is None:
            raise EngineBuildError("TensorRT could not serialize the timing cache")
        contents = bytes(memoryview(serialized))
        bundle_copy.write_bytes(contents)
        try:
            write_file_atomically(self.timing_cache_path, lambda handle: handle.write(contents))
        except OSError as error:
            warnings.warn(
                f"could not keep the timing cache at {self.timing_cache_path} ({error}); the next build times every tactic again",
                RuntimeWarning,
                stacklevel=2,
            )


def build_engines(
    bundle_dir: Path,
    embeddings: GraphFile,
    layers: list[GraphFile],
    shape_range: ShapeRange,
    fp16: bool,
    progress: bool,
) -> TensorRTEngines:
    """Build trt/embeddings.engine and trt/layer_NN.engine next to the ONNX graphs; returns the manifest's tensorrt block.

    fp16 is recorded, not applied: the graphs of an --fp16 export already carry their precision.
    """
    import tensorrt as trt

    gpu = gpu_name()
    builder = EngineBuilder(shape_range, machine_timing_cache(trt.__version__, gpu or "unknown GPU"))
    (bundle_dir / ENGINE_DIR).mkdir(exist_ok=True)
    entries = []
    for graph in tqdm([embeddings, *layers], desc="tensorrt", unit="engine", disable=not progress):
        relative = engine_file(Path(graph.file).stem)
        builder.build(bundle_dir / graph.file, graph.spec, bundle_dir / relative)
        entries.append(FileEntry.of(bundle_dir, relative))
    builder.save_timing_cache(bundle_dir / ENGINE_DIR / TIMING_CACHE_NAME)
    return TensorRTEngines(
        version=trt.__version__,
        gpu=gpu,
        fp16=fp16,
        max_batch_size=shape_range.max_batch_size,
        max_seq_len=shape_range.max_seq_len,
        embeddings=entries[0],
        layers=entries[1:],
        timing_cache=f"{ENGINE_DIR}/{TIMING_CACHE_NAME}",
    )
