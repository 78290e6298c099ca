"""pcee-export --tensorrt without a GPU: version gates, builder settings on TensorRT 10 and 11, timing-cache
reuse (fake tensorrt modules injected into sys.modules), and the engines' parity through the runtime's
TensorRT backend on emulated engines with a batch limit below the parity batches'.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

pytest.importorskip("torch", reason="exporting needs the export extras (torch)")

from emulated_gpu import EmulatedTensorRT, SoftwareCuda, onnxruntime_compute, write_engine_files  # noqa: E402
from tiny_models import make_tiny_model_dir  # noqa: E402

from pcee.exporter import bundle as bundle_module  # noqa: E402
from pcee.exporter import tensorrt as exporter_tensorrt  # noqa: E402
from pcee.exporter.bundle import ExportOptions, export_bundle  # noqa: E402
from pcee.exporter.errors import TensorRTUnavailableError  # noqa: E402
from pcee.exporter.parity import BATCH_SIZES  # noqa: E402
from pcee.runtime import Manifest  # noqa: E402
from pcee.runtime.backends import cuda_memory  # noqa: E402
from pcee.runtime.backends import tensorrt as tensorrt_backend  # noqa: E402
from pcee.runtime.graphs import layer_spec  # noqa: E402

FAKE_GPU = "NVIDIA Fake GPU"


# -- a fake tensorrt module: just what the engine builder calls ------------------------------------------
class FakeTimingCache:
    def __init__(self, contents: bytes):
        self.contents = contents

    def serialize(self):
        return self.contents


class FakeConfig:
    def __init__(self, builder: FakeBuilder):
        self.builder = builder
        self.flags: list = []

    def create_timing_cache(self, serialized):
        self.builder.caches_created.append(bytes(serialized))
        return FakeTimingCache(bytes(serialized) or b"empty")

    def set_flag(self, flag):
        self.flags.append(flag)

    def add_optimization_profile(self, profile):
        return 0

    def set_timing_cache(self, cache, ignore_mismatch):
        self.builder.cache_in_use = cache
        return True


class FakeBuilder:
    def __init__(self, logger):
        self.network_flags: list[int] = []
        self.caches_created: list[bytes] = []
        self.configs: list[FakeConfig] = []
        self.cache_in_use: FakeTimingCache | None = None

    def create_network(self, flags):
        self.network_flags.append(flags)
        return SimpleNamespace()

    def create_builder_config(self):
        self.configs.append(FakeConfig(self))
        return self.configs[-1]

    def create_optimization_profile(self):
        return SimpleNamespace(set_shape=lambda name, minimum, optimum, maximum: None)

    def build_serialized_network(self, network, config):
        # Each build adds its timings to the shared cache, as TensorRT does.
        self.cache_in_use.contents += b"+timings"
        return b"engine"


def fake_tensorrt(version: str) -> ModuleType:
    """TensorRT `version`'s Python API as far as the builder uses it; 11 has no FP16/INT8 flags (removed there)."""
    module = ModuleType("tensorrt")
    module.__version__ = version
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    module.Builder = FakeBuilder
    module.OnnxParser = lambda network, logger: SimpleNamespace(
        parse_from_file=lambda path: True, num_errors=0
    )
    module.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0}
    )
    flags = (
        {"TF32": 1, "REFIT": 2} if version.startswith("11") else {"FP16": 0, "TF32": 1, "REFIT": 2, "INT8": 3}
    )
    module.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    return module


@pytest.fixture
def gpu_here(monkeypatch):
    monkeypatch.setattr(exporter_tensorrt, "gpu_name", lambda: FAKE_GPU)


# -- version gates -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "10.0.1", "12.0.0"])
def test_export_refuses_tensorrt_the_runtime_cannot_load(monkeypatch, gpu_here, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    with pytest.raises(
        TensorRTUnavailableError, match=rf"TensorRT 10.1 or newer, below 12 \(found {version}\)"
    ):
        exporter_tensorrt.require_tensorrt()


@pytest.mark.parametrize("version", ["10.1.0", "10.16.1.11", "11.4.0.106"])
def test_export_accepts_tensorrt_10_and_11(monkeypatch, gpu_here, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    exporter_tensorrt.require_tensorrt()


def test_export_without_tensorrt_names_the_package(monkeypatch, gpu_here):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    with pytest.raises(
        TensorRTUnavailableError, match=r"the tensorrt Python package \(pip install 'pcee\[gpu\]'\)"
    ):
        exporter_tensorrt.require_tensorrt()


# -- the builder on TensorRT 10 and 11 ---------------------------------------------------------------------
def build_fake_engines(monkeypatch, tmp_path: Path, version: str) -> FakeBuilder:
    """Run EngineBuilder over two layer graphs with a fake TensorRT `version`; returns its builder."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    builder = exporter_tensorrt.EngineBuilder(exporter_tensorrt.ShapeRange(4, 16), tmp_path / "timing.cache")
    spec = layer_spec(32, 2, False, "float32")
    for index in range(2):
        builder.build(tmp_path / f"layer_{index}.onnx", spec, tmp_path / f"layer_{index}.engine")
    builder.save_timing_cache(tmp_path / "bundle-timing.cache")
    return builder.builder


@pytest.mark.parametrize(("version", "network_flags"), [("10.16.1.11", 1 << 0), ("11.4.0.106", 0)])
def test_networks_are_strongly_typed_and_no_precision_flag_is_set(
    monkeypatch, tmp_path, version, network_flags
):
    """The ONNX graph's own dtypes (float32, or --fp16's half layers) carry the precision on 10 and 11 alike."""
    builder = build_fake_engines(monkeypatch, tmp_path, version)
    assert builder.network_flags == [network_flags, network_flags]
    assert all(config.flags == [] for config in builder.configs)


def test_the_next_build_starts_from_the_saved_timing_cache(monkeypatch, tmp_path):
    first = build_fake_engines(monkeypatch, tmp_path, "10.16.1.11")
    assert first.caches_created == [b""]  # nothing saved yet: an empty cache
    saved = (tmp_path / "timing.cache").read_bytes()
    assert saved == b"empty+timings+timings" and (tmp_path / "bundle-timing.cache").read_bytes() == saved
    second = build_fake_engines(monkeypatch, tmp_path, "10.16.1.11")
    assert second.caches_created == [saved]
    assert (tmp_path / "timing.cache").read_bytes() == saved + b"+timings+timings"


def test_an_unreadable_timing_cache_is_replaced_not_fatal(monkeypatch, tmp_path):
    (tmp_path / "timing.cache").write_bytes(b"written by another TensorRT")
    monkeypatch.setattr(
        FakeConfig,
        "create_timing_cache",
        lambda self, serialized: None if serialized else FakeTimingCache(b"empty"),
    )
    with pytest.warns(RuntimeWarning, match="could not read the timing cache"):
        build_fake_engines(monkeypatch, tmp_path, "11.4.0.106")
    assert (tmp_path / "timing.cache").read_bytes() == b"empty+timings+timings"


def test_the_timing_cache_lives_per_tensorrt_version_and_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = exporter_tensorrt.machine_timing_cache("10.16.1.11", "NVIDIA H200 NVL")
    assert path == tmp_path / "pcee" / "tensorrt" / "timing-10.16.1.11-NVIDIA_H200_NVL.cache"


# -- parity of engines whose batch limit is below the parity batches' ---------------------------------------
def test_engine_parity_fits_a_small_max_batch_size(monkeypatch, tmp_path):
    """--max-batch-size 3 < the parity batches' 8 rows: parity cuts its batches to the engines' limit."""
    max_rows = 3
    assert max(BATCH_SIZES) > max_rows
    cuda = SoftwareCuda()
    monkeypatch.setattr(cuda_memory, "import_cudart", lambda: cuda)
    monkeypatch.setattr(bundle_module, "require_tensorrt", lambda: None)

    def build_emulated_engines(bundle_dir, embeddings, layers, shape_range, fp16, progress):
        tensorrt = EmulatedTensorRT(
            bundle_dir, onnxruntime_compute(cuda), shape_range.max_batch_size, shape_range.max_seq_len
        )
        monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: tensorrt)
        return write_engine_files(
            bundle_dir, [embeddings, *layers], shape_range.max_batch_size, shape_range.max_seq_len
        )

    monkeypatch.setattr(bundle_module, "build_engines", build_emulated_engines)
    model_dir = make_tiny_model_dir(tmp_path, num_layers=2)
    result = export_bundle(
        model_dir, tmp_path / "bundle", ExportOptions(tensorrt=True, max_batch_size=max_rows)
    )
    manifest = Manifest.load(result.bundle_dir)
    assert manifest.tensorrt.max_batch_size == max_rows
    assert "tensorrt" in manifest.parity.backends and "tensorrt/layer_02" in manifest.parity.max_abs_diff
