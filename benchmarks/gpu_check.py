"""One-shot check of the GPU backends against the CPU backend, on a real GPU; prints JSON.

Run from the repository root on a GPU machine; pcee need not be installed:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --json-out $OUT/gpu_check.json
    python3 benchmarks/gpu_check.py --dry-run    # the stages, and why each would be skipped here

Without --bundle it builds a tiny random 4-layer bundle in a subprocess (torch, transformers and
onnx there). Stages, in order (`STAGES`):
- environment: package versions, onnxruntime's providers, the GPU;
- device_memory: the compaction plan's 2D copies on the GPU against numpy (cuda-python);
- bundle, tensorrt_engines: the bundle, and TensorRT engines built into it when tensorrt is here;
- backends: each GPU backend (tensorrt, onnxruntime-cuda) against onnxruntime CPU: every exit of every
  row, spans and compactions in a fixed order, predictions where some rows leave early, concurrent
  callers, chunks clamped to the engines' batch limit, synchronisations per request, timings;
- the same checks on the TensorRT backend with asynchronous emulated engines (tensorrt-emulated-async):
  its real buffers, streams, compaction and single sync per span on the GPU, where each engine call is
  the exported torch module run on the backend's stream, reading and writing the backend's own device
  buffers (needs torch with CUDA, no TensorRT). No host sync hides an ordering hazard here;
- torch_measurements: the per-layer launch-and-sync chain against one forward pass and a CUDA graph
  (batch 1 and 32), and the compaction plan's 2D copies against a gather kernel;
- pytest_gpu: the gpu-marked tests (unless --no-pytest).

The real backend stages run before anything imports torch, as in production. Each stage reports ran,
skipped (with why) or failed (with the error). "ok" is true only when at least one GPU backend stage
ran and no stage failed; the exit status is 0 exactly then. Expect two to four minutes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PACKAGE_FOLDERS = ("modeling", "exporter", "runtime", "calibration", "demo", "benchmarks")
EXPORT_MODULES = ("torch", "transformers", "onnx", "safetensors")
NUM_LAYERS = 4
EMULATED = "tensorrt-emulated-async"
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", EMULATED)  # the stages that make a run "ok"
MIN_AGREEMENT = 0.97  # of exit layers with the CPU: TF32 matmuls may flip a row sitting on tau
WORDS = (
    "the a movie film story plot actors music ending scene it was is not very really quite good great fun moving "
    "bad dull awful boring long slow funny sad and but with of in to what who"
).split()


class Skipped(Exception):
    """A stage that cannot run here; the message says what is missing."""


# -- making pcee importable without an install ------------------------------------------------------
def make_pcee_importable() -> dict[str, str]:
    """Import pcee from this checkout: an install when it points here, else links pcee/<folder> -> <folder>.

    Returns the environment a subprocess needs to import the same pcee.
    """
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))  # tiny_models and emulated_gpu, the tests' own helpers
    try:
        import pcee.runtime

        if Path(pcee.runtime.__file__).resolve().is_relative_to(REPO):
            return dict(os.environ)
    except ImportError:
        pass
    for name in [module for module in sys.modules if module == "pcee" or module.startswith("pcee.")]:
        del sys.modules[name]
    root = Path(tempfile.mkdtemp(prefix="pcee-import-"))
    (root / "pcee").mkdir()
    for folder in PACKAGE_FOLDERS:
        (root / "pcee" / folder).symlink_to(REPO / folder, target_is_directory=True)
    sys.path.insert(0, str(root))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }


# -- what each stage needs, checked without running it ---------------------------------------------------
def missing_cuda() -> list[str]:
    from pcee.runtime import BackendUnavailableError
    from pcee.runtime.backends.cuda_memory import CudaRuntime

    try:
        CudaRuntime.load()
    except BackendUnavailableError as missing:
        return [str(missing)]
    return []


def missing_tensorrt() -> list[str]:
    from pcee.runtime import tensorrt_version_problem

    try:
        import tensorrt
    except ImportError:
        return ["the tensorrt package"]
    problem = tensorrt_version_problem(tensorrt.__version__)
    return [] if problem is None else [problem]


def missing_cuda_provider() -> list[str]:
    from pcee.runtime import cuda_provider_problems

    return cuda_provider_problems()


def missing_export_packages() -> list[str]:
    missing = [name for name in EXPORT_MODULES if importlib.util.find_spec(name) is None]
    return [f"{', '.join(missing)} to build the tiny bundle (or pass --bundle)"] if missing else []


def missing_torch_cuda() -> list[str]:
    if importlib.util.find_spec("torch") is None:
        return ["torch"]
    import torch

    return [] if torch.cuda.is_available() else [f"torch with CUDA (torch {torch.__version__} sees no GPU)"]


def missing_for_torch_stages(model_dir_known: bool) -> list[str]:
    """The emulated engines and the measurements run the bundle's own model in torch, on the GPU."""
    missing = missing_torch_cuda() + missing_cuda()
    return (
        missing
        if model_dir_known
        else [*missing, "--model-dir, the model directory --bundle was exported from"]
    )


def model_dir_known(arguments: argparse.Namespace) -> bool:
    return not arguments.bundle or arguments.model_dir is not None


@dataclass(frozen=True)
class Stage:
    name: str
    checks: str
    needs: Callable[[argparse.Namespace], list[str]]


STAGES = (
    Stage("environment", "package versions, onnxruntime's providers, the GPU", lambda arguments: []),
    Stage(
        "device_memory",
        "compaction plans executed by cudaMemcpy2DAsync on the GPU equal numpy's gather",
        lambda arguments: missing_cuda(),
    ),
    Stage(
        "bundle",
        "a tiny random 4-layer bundle, built in a subprocess",
        lambda arguments: [] if arguments.bundle else missing_export_packages(),
    ),
    Stage(
        "tensorrt_engines",
        "TensorRT engines built into the bundle",
        lambda arguments: missing_tensorrt() + missing_cuda(),
    ),
    Stage(
        "backends/tensorrt",
        "the TensorRT backend against onnxruntime CPU",
        lambda arguments: missing_tensorrt() + missing_cuda(),
    ),
    Stage(
        "backends/onnxruntime-cuda",
        "the onnxruntime CUDA backend against onnxruntime CPU",
        lambda arguments: missing_cuda_provider() + missing_cuda(),
    ),
    Stage(
        f"backends/{EMULATED}",
        "the TensorRT backend's buffers, streams, compaction and syncs on the GPU, each engine the "
        "exported torch module on the backend's stream",
        lambda arguments: missing_for_torch_stages(model_dir_known(arguments)),
    ),
    Stage(
        "torch_measurements",
        "per-layer launch+sync chain vs one forward pass vs a CUDA graph; 2D-copy compaction vs a gather kernel",
        lambda arguments: missing_for_torch_stages(model_dir_known(arguments)),
    ),
    Stage(
        "pytest_gpu",
        "the gpu-marked tests of tests/test_runtime_gpu_backends.py",
        lambda arguments: ["--no-pytest"] if arguments.no_pytest else missing_cuda(),
    ),
)


def dry_run(arguments: argparse.Namespace) -> dict:
    """Every stage, whether it would run here, and what it would be missing."""
    bundle_missing = STAGES[2].needs(arguments)
    stages = []
    for stage in STAGES:
        missing = stage.needs(arguments)
        if stage.name not in ("environment", "device_memory", "bundle") and bundle_missing:
            missing = [*missing, "the bundle stage"]
        stages.append(
            {
                "stage": stage.name,
                "checks": stage.checks,
                "would": "skip" if missing else "run",
                "needs": missing,
            }
        )
    backends = [entry for entry in stages if entry["stage"].startswith("backends/")]
    return {
        "dry_run": True,
        "stages": stages,
        "would_be_ok": any(entry["would"] == "run" for entry in backends),
    }


# -- running stages and judging the run ------------------------------------------------------------------
def run_stage(summary: dict, name: str, function, *arguments) -> dict | None:
    """Run one stage, record it under `name` as ran, skipped or failed; returns its result (None unless it ran and passed)."""
    started = time.perf_counter()
    result = None
    try:
        result = function(*arguments)
        outcome = {"status": "ran" if result.get("passed", True) else "failed", **result}
    except Skipped as reason:
        outcome = {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # a check script reports every failure instead of stopping at the first
        outcome = {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=-4),
        }
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    summary[name] = outcome
    print(f"[gpu_check] {name}: {outcome['status']} ({outcome['seconds']} s)", file=sys.stderr)
    return result if outcome["status"] == "ran" else None


def verdict(summary: dict) -> dict:
    """ok: at least one GPU backend stage ran, and no stage failed."""
    stages = {name: stage for name, stage in summary.items() if isinstance(stage, dict) and "status" in stage}
    stages.update({f"backends/{name}": stage for name, stage in summary.get("backends", {}).items()})
    ran = [name for name in GPU_BACKENDS if summary.get("backends", {}).get(name, {}).get("status") == "ran"]
    failed = sorted(name for name, stage in stages.items() if stage["status"] == "failed")
    return {"gpu_backends_ran": ran, "failed_stages": failed, "ok": bool(ran) and not failed}


def skip_unless_empty(missing: list[str]) -> None:
    if missing:
        raise Skipped("needs " + "; ".join(missing))


# -- environment and device memory -----------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    names = (
        "numpy",
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorrt",
        "tensorrt-cu12",
        "tensorrt-cu13",
        "cuda-python",
        "cuda-bindings",
        "cupy-cuda12x",
        "cupy-cuda13x",
        "torch",
        "transformers",
    )
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def environment() -> dict:
    import onnxruntime

    from pcee.runtime import broken_gpu_wheel

    missing = missing_cuda()
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "packages": package_versions(),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "onnxruntime_gpu_wheel_problem": broken_gpu_wheel(),
        "gpu": f"unavailable: needs {missing[0]}" if missing else require_cuda_runtime().device_description(),
    }


def require_cuda_runtime():
    from pcee.runtime.backends.cuda_memory import CudaRuntime

    skip_unless_empty(missing_cuda())
    return CudaRuntime.load()


def device_memory_check() -> dict:
    """The compaction plan executed by cudaMemcpy2DAsync on the GPU equals numpy's hidden[keep, :longest]."""
    from pcee.runtime.backends.cuda_memory import Allocations, plan_compaction, row_extents

    cuda = require_cuda_runtime()
    memory = Allocations(cuda)
    rng = np.random.default_rng(0)
    mismatches = 0
    try:
        stream = memory.stream()
        for _ in range(50):
            rows, sequence, hidden_size = (
                int(rng.integers(1, 33)),
                int(rng.integers(1, 130)),
                int(rng.integers(1, 65)),
            )
            lengths = rng.integers(1, sequence + 1, size=rows)
            lengths[rng.integers(rows)] = sequence
            mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)
            keep = rng.random(rows) < 0.6
            keep[rng.integers(rows)] = True
            hidden = rng.standard_normal((rows, sequence, hidden_size)).astype(np.float32)
            plan = plan_compaction(keep, row_extents(mask), sequence, hidden_size * 4, 4)
            source, target = memory.device(hidden.nbytes), memory.device(hidden.nbytes)
            result = memory.pinned((plan.rows, plan.sequence_length, hidden_size), np.float32)
            cuda.copy_to_device(source, hidden, stream)
            cuda.enqueue_copies(plan.hidden_copies, source, target, stream)
            cuda.copy_to_host(result, target, result.nbytes, stream)
            cuda.synchronize(stream)
            mismatches += not np.array_equal(result, hidden[keep, : plan.sequence_length])
    finally:
        memory.free_all()
    return {"cases": 50, "mismatches": mismatches, "passed": mismatches == 0}


# -- the bundle --------------------------------------------------------------------------------------
def prepare_tiny_bundle(target: Path) -> None:
    """Build a tiny random bundle at `target` (runs in a subprocess: imports torch); prints its model directory."""
    from tiny_models import make_tiny_model_dir

    from pcee.exporter.bundle import export_bundle

    model_dir = make_tiny_model_dir(target.parent / "model", num_layers=NUM_LAYERS)
    export_bundle(model_dir, target)
    print(json.dumps({"model_dir": str(model_dir)}))


def bundle_stage(arguments: argparse.Namespace, work_dir: Path, environment_variables: dict) -> dict:
    bundle = work_dir / "bundle"
    if arguments.bundle:
        shutil.copytree(arguments.bundle, bundle)  # engines may be added: never touch the given bundle
        source, model_dir = str(arguments.bundle), arguments.model_dir
    else:
        skip_unless_empty(missing_export_packages())
        command = [sys.executable, str(Path(__file__).resolve()), "--prepare-bundle", str(bundle)]
        completed = subprocess.run(
            command, capture_output=True, text=True, env=environment_variables, timeout=300
        )
        if completed.returncode != 0:
            raise RuntimeError(f"building the tiny bundle failed: {completed.stderr[-2000:]}")
        source, model_dir = (
            "tiny random model built here",
            json.loads(completed.stdout.strip().splitlines()[-1])["model_dir"],
        )
    from pcee.runtime import Manifest

    manifest = Manifest.load(bundle)
    return {
        "path": str(bundle),
        "model_dir": None if model_dir is None else str(model_dir),
        "source": source,
        "architecture": manifest.model.architecture,
        "num_layers": manifest.model.num_layers,
        "precision": manifest.model.precision,
        "has_engines": manifest.tensorrt is not None,
    }


def engines_stage(bundle: Path, arguments: argparse.Namespace) -> dict:
    from pcee.runtime import Manifest

    manifest = Manifest.load(bundle)
    if manifest.tensorrt and not arguments.rebuild_engines:
        return {
            "built": False,
            "tensorrt": {
                key: value for key, value in manifest.tensorrt.to_dict().items() if key != "engines"
            },
        }
    skip_unless_empty(missing_tensorrt() + missing_cuda())
    import tensorrt

    from pcee.exporter.tensorrt import ShapeRange, build_engines

    shape_range = ShapeRange(arguments.max_batch_size, manifest.model.max_seq_len)
    manifest.tensorrt = build_engines(
        bundle, manifest.embeddings, manifest.layers, shape_range, manifest.model.precision == "fp16", False
    )
    manifest.save(bundle)
    return {
        "built": True,
        "tensorrt_version": tensorrt.__version__,
        "max_batch_size": arguments.max_batch_size,
    }


# -- comparing a GPU backend with the CPU backend ----------------------------------------------------
def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=count)
    lengths[: max(1, count // 16)] = 200  # a few rows the tokenizer truncates
    return [" ".join(rng.choice(WORDS, size=int(length))) for length in lengths]


def max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(
        np.max(np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64)))
    )


def partial_exit_point(cpu, texts: list[str], batch_size: int):
    """PCEE (entropy) with tau in the widest gap of the middle rows: some rows leave at the patience, the rest are compacted."""
    from pcee.runtime import DEFAULT_POLICY, OperatingPoint

    patience = min(2, cpu.num_layers)
    exits = cpu.run_all_exits(cpu.tokenizer.encode_texts(texts), batch_size=batch_size)
    deciding = np.sort(exits.entropy[:, :patience].max(axis=1))
    middle = range(len(deciding) // 4, max(len(deciding) // 4 + 1, 3 * len(deciding) // 4))
    widest = max(middle, key=lambda index: deciding[min(index + 1, len(deciding) - 1)] - deciding[index])
    tau = float((deciding[widest] + deciding[min(widest + 1, len(deciding) - 1)]) / 2)
    return OperatingPoint(policy=DEFAULT_POLICY, tau=min(max(tau, 0.0), 1.0), patience=patience)


def all_exits_check(gpu, cpu, texts: list[str], batch_size: int) -> dict:
    batch = cpu.tokenizer.encode_texts(texts)
    actual, expected = (
        gpu.run_all_exits(batch, batch_size=batch_size),
        cpu.run_all_exits(batch, batch_size=batch_size),
    )
    return {
        "logits_max_diff": max_difference(actual.logits, expected.logits),
        "entropy_max_diff": max_difference(actual.entropy, expected.entropy),
        "max_probability_max_diff": max_difference(actual.max_probability, expected.max_probability),
    }


def compaction_check(gpu, cpu, texts: list[str], batch_size: int) -> dict:
    """Layer spans and compactions in a fixed order, the longest row dropped first so the sequence is trimmed."""
    batch = cpu.tokenizer.encode_texts(texts[:batch_size])
    rows, layers = len(batch), cpu.num_layers
    gpu_state, cpu_state = gpu.backend.begin(batch), cpu.backend.begin(batch)
    worst, done, keep = 0.0, 0, np.ones(rows, dtype=bool)
    rng = np.random.default_rng(1)
    longest_first = True
    try:
        while done < layers:
            span = min(2, layers - done)
            for got, want in zip(
                gpu.backend.run_layers(gpu_state, done, span), cpu.backend.run_layers(cpu_state, done, span)
            ):
                worst = max(
                    worst, max_difference(got.logits, want.logits), max_difference(got.entropy, want.entropy)
                )
            done += span
            if done < layers and keep.sum() > 1:
                lengths = batch.attention_mask[keep].sum(axis=1)
                step = rng.random(int(keep.sum())) < 0.7
                if longest_first:
                    step[np.argmax(lengths)] = False
                    longest_first = False
                step[np.argmin(lengths)] = True
                gpu_state, cpu_state = (
                    gpu.backend.compact(gpu_state, step),
                    cpu.backend.compact(cpu_state, step),
                )
                keep[np.flatnonzero(keep)[~step]] = False
    finally:
        gpu.backend.finish(gpu_state)
        cpu.backend.finish(cpu_state)
    return {"rows": rows, "rows_left": int(keep.sum()), "records_max_diff": worst}


def predictions_check(gpu, cpu, texts: list[str], batch_size: int, point) -> dict:
    expected = cpu.predict(texts, operating_point=point, batch_size=batch_size)
    actual = gpu.predict(texts, operating_point=point, batch_size=batch_size)
    expected_layers = np.array([row.exit_layer for row in expected.predictions])
    actual_layers = np.array([row.exit_layer for row in actual.predictions])
    same = actual_layers == expected_layers
    probabilities = max_difference(
        np.stack([row.probabilities for row in actual.predictions])[same],
        np.stack([row.probabilities for row in expected.predictions])[same],
    )
    return {
        "operating_point": point.to_dict(),
        "exit_layer_histogram": np.bincount(expected_layers, minlength=cpu.num_layers + 1)[1:].tolist(),
        "exit_layer_agreement": float(same.mean()),
        "probabilities_max_diff": probabilities,
        "layer_speedup": {"gpu": actual.layer_speedup, "cpu": expected.layer_speedup},
    }


def concurrency_check(gpu, texts: list[str], batch_size: int, point, threads: int = 8) -> dict:
    workloads = [
        texts[start:] + texts[:start] for start in range(0, len(texts), max(1, len(texts) // threads))
    ][:threads]
    sequential = [gpu.predict(work, operating_point=point, batch_size=batch_size) for work in workloads]
    results: dict[int, list] = {index: [] for index in range(len(workloads))}

    def serve(index: int) -> None:
        for _ in range(3):
            results[index].append(gpu.predict(workloads[index], operating_point=point, batch_size=batch_size))

    workers = [threading.Thread(target=serve, args=(index,)) for index in range(len(workloads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    identical = all(
        [row.exit_layer for row in result.predictions] == [row.exit_layer for row in expected.predictions]
        and all(
            np.array_equal(a.probabilities, b.probabilities)
            for a, b in zip(result.predictions, expected.predictions)
        )
        for index, expected in enumerate(sequential)
        for result in results[index]
    )
    return {"threads": len(workloads), "calls_per_thread": 3, "identical_to_sequential": identical}


def clamp_check(gpu, cpu, texts: list[str]) -> dict:
    """Chunks larger than the engines take are clamped to them; a batch past them is refused by the backend itself."""
    from pcee.runtime import InputError

    limit = gpu.backend.max_rows
    rows = (texts * (limit + 1))[: limit + 1]
    clamped = gpu.predict(rows, batch_size=limit + 1)
    expected = cpu.predict(rows, batch_size=limit + 1)
    try:
        gpu.backend.finish(gpu.backend.begin(gpu.tokenizer.encode_texts(rows)))
        refused = False
    except InputError:
        refused = True
    agreement = np.mean(
        [got.exit_layer == want.exit_layer for got, want in zip(clamped.predictions, expected.predictions)]
    )
    return {"max_rows": limit, "exit_layer_agreement": float(agreement), "backend_refuses_more_rows": refused}


class SyncCounter:
    """Counts a runtime's stream synchronisations, by wrapping the synchronize of its CudaRuntime."""

    def __init__(self, cuda):
        self.count = 0
        original = cuda.synchronize

        def counted(stream) -> None:
            self.count += 1
            original(stream)

        cuda.synchronize = counted


def sync_check(gpu, texts: list[str]) -> dict:
    """With a tau nothing is confident below, every request runs all layers in ceil(layers / patience) spans: one sync each."""
    from pcee.runtime import DEFAULT_POLICY, OperatingPoint

    counter = SyncCounter(gpu.backend.cuda)
    layers = gpu.num_layers
    per_patience = {}
    for patience in sorted({1, 2, layers}):
        point = OperatingPoint(policy=DEFAULT_POLICY, tau=0.0, patience=patience)
        counts = []
        for request in (texts[:1], texts[:2], texts[: min(8, gpu.backend.max_rows)]):
            before = counter.count
            gpu.predict(request, operating_point=point)
            counts.append(counter.count - before)
        per_patience[patience] = {
            "syncs_per_request": counts,
            "expected_at_most": math.ceil(layers / patience),
        }
    passed = all(
        max(entry["syncs_per_request"]) <= entry["expected_at_most"] for entry in per_patience.values()
    )
    return {"layers": layers, "by_patience": per_patience, "passed": passed}


def median_seconds(runtime, texts: list[str], batch_size: int, repeats: int = 5) -> float:
    runtime.predict(texts, batch_size=batch_size)  # warm-up: first-call allocations and autotuning
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runtime.predict(texts, batch_size=batch_size)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 5)


def compare_with_cpu(gpu, bundle: Path, texts: list[str], tolerance: float, tensorrt_like: bool) -> dict:
    """Every check of one GPU runtime against onnxruntime CPU on the same bundle."""
    from pcee.runtime import EarlyExitRuntime

    with EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu") as cpu:
        batch_size = min(16, gpu.backend.max_rows or 16)
        result = {"device": gpu.device, "batch_size": batch_size, "tolerance": tolerance}
        result["all_exits"] = all_exits_check(gpu, cpu, texts, batch_size)
        result["compaction"] = compaction_check(gpu, cpu, texts, batch_size)
        point = partial_exit_point(cpu, texts, batch_size)
        result["predictions"] = predictions_check(gpu, cpu, texts, batch_size, point)
        result["concurrency"] = concurrency_check(gpu, texts, batch_size, point)
        if tensorrt_like:
            result["clamp"] = clamp_check(gpu, cpu, texts)
            result["syncs"] = sync_check(gpu, texts)
        result["median_predict_seconds"] = {
            "gpu": median_seconds(gpu, texts, batch_size),
            "cpu": median_seconds(cpu, texts, batch_size),
        }
    result["passed"] = bool(
        max(result["all_exits"].values()) <= tolerance
        and result["compaction"]["records_max_diff"] <= tolerance
        and result["predictions"]["exit_layer_agreement"] >= MIN_AGREEMENT
        and result["predictions"]["probabilities_max_diff"] <= tolerance
        and result["concurrency"]["identical_to_sequential"]
        and (not tensorrt_like or tensorrt_checks_passed(result))
    )
    return result


def tensorrt_checks_passed(result: dict) -> bool:
    clamp = result["clamp"]
    return (
        clamp["exit_layer_agreement"] >= MIN_AGREEMENT
        and clamp["backend_refuses_more_rows"]
        and result["syncs"]["passed"]
    )


def backend_stage(backend: str, bundle: Path, texts: list[str]) -> dict:
    from pcee.runtime import BackendUnavailableError, EarlyExitRuntime

    try:
        gpu = EarlyExitRuntime.from_bundle(bundle, backend=backend)
    except BackendUnavailableError as missing:
        raise Skipped(str(missing)) from None
    engines = gpu.manifest.tensorrt
    half = gpu.manifest.model.precision == "fp16" or bool(engines and engines.fp16 and backend == "tensorrt")
    with gpu:
        return compare_with_cpu(
            gpu, bundle, texts, 3e-2 if half else 5e-3, backend == "tensorrt"
        )  # TF32 moves fp32 by ~1e-3


# -- the TensorRT backend with asynchronous emulated engines (torch on the backend's stream) ------------------
class DeviceArray:
    """A device buffer as the CUDA Array Interface describes it, so torch views it without a copy."""

    def __init__(self, pointer: int, shape: tuple[int, ...], dtype: np.dtype):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": np.dtype(dtype).str,
            "data": (int(pointer), False),
            "version": 2,
        }


def torch_compute(torch, modules: dict):
    """Engines whose call is the exported torch module, enqueued on the backend's stream over the backend's own buffers."""

    def make_compute(path: Path):
        module = modules[path.stem]

        def compute(context, stream: int) -> None:
            spec = context.engine.spec

            def view(name: str, shape: tuple[int, ...]):
                return torch.as_tensor(
                    DeviceArray(context.addresses[name], shape, context.engine.dtypes[name]), device="cuda"
                )

            with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))), torch.no_grad():
                outputs = module(*(view(tensor.name, context.shapes[tensor.name]) for tensor in spec.inputs))
                for tensor, value in zip(spec.outputs, outputs):
                    view(tensor.name, tuple(value.shape)).copy_(value)

        return compute

    return make_compute


def graph_modules(model) -> dict:
    """The modules each graph of a bundle is exported from, keyed by graph name ('embeddings', 'layer_01', ...)."""
    from pcee.exporter.graphs import EmbeddingsGraph, LayerGraph
    from pcee.runtime import layer_graph_name

    modules = {"embeddings": EmbeddingsGraph(model)}
    modules.update({layer_graph_name(index): LayerGraph(model, index) for index in range(model.num_layers)})
    return modules


def bundle_model(model_dir: str):
    """The bundle's model on the GPU, prepared as the exporter prepared it."""
    from pcee.exporter.bundle import load_model

    return load_model(Path(model_dir)).cuda()


def require_torch_cuda():
    skip_unless_empty(missing_torch_cuda())
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # compared with onnxruntime CPU at float32 precision
    return torch


def emulated_stage(
    bundle: Path, model_dir: str | None, texts: list[str], max_batch_size: int, work_dir: Path
) -> dict:
    from pcee.runtime import EarlyExitRuntime, Manifest
    from pcee.runtime.backends import tensorrt as tensorrt_backend

    skip_unless_empty(missing_for_torch_stages(model_dir is not None))
    torch = require_torch_cuda()
    from emulated_gpu import EmulatedTensorRT, write_engine_files

    emulated_bundle = work_dir / "bundle-emulated-engines"
    shutil.copytree(bundle, emulated_bundle, dirs_exist_ok=True)
    manifest = Manifest.load(emulated_bundle)
    manifest.tensorrt = write_engine_files(
        emulated_bundle, [manifest.embeddings, *manifest.layers], max_batch_size, manifest.model.max_seq_len
    )
    manifest.save(emulated_bundle)
    engines = torch_compute(torch, graph_modules(bundle_model(model_dir)))
    emulated = EmulatedTensorRT(emulated_bundle, engines, max_batch_size, manifest.model.max_seq_len)
    real_import = tensorrt_backend.import_tensorrt
    tensorrt_backend.import_tensorrt = lambda: emulated
    try:
        gpu = EarlyExitRuntime.from_bundle(emulated_bundle, backend="tensorrt")
    finally:
        tensorrt_backend.import_tensorrt = real_import
    with gpu:
        return {
            "engine": "torch on the backend's stream",
            **compare_with_cpu(gpu, emulated_bundle, texts, 1e-4, tensorrt_like=True),
        }


# -- torch measurements: the GPU's chain_overhead analogue --------------------------------------------------
def median_ms(torch, work: Callable[[], object], repeats: int = 30) -> float:
    for _ in range(3):
        work()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 4)


def chain_against_single_pass(torch, model, rows: int, length: int) -> dict:
    """Per-layer launch + sync (what a span of one costs), one sync per chain, one forward pass, and its CUDA graph."""
    from pcee.exporter.graphs import FullModelGraph

    modules, full = graph_modules(model), FullModelGraph(model)
    ids = torch.randint(5, 100, (rows, length), device="cuda")
    mask = torch.ones_like(ids)
    layers = [module for name, module in sorted(modules.items()) if name != "embeddings"]

    def chain(sync_each_layer: bool) -> None:
        hidden, bias = modules["embeddings"](ids, mask)
        for layer in layers:
            hidden = layer(hidden, bias)[0]
            if sync_each_layer:
                torch.cuda.synchronize()

    with torch.no_grad():
        timings = {
            "chain_sync_per_layer_ms": median_ms(torch, lambda: chain(True)),
            "chain_one_sync_ms": median_ms(torch, lambda: chain(False)),
            "single_pass_ms": median_ms(torch, lambda: full(ids, mask)),
        }
        timings.update(cuda_graph_timing(torch, lambda: full(ids, mask)))
    single = timings["single_pass_ms"]
    timings["chain_overhead_sync_per_layer"] = round(timings["chain_sync_per_layer_ms"] / single, 3)
    timings["chain_overhead_one_sync"] = round(timings["chain_one_sync_ms"] / single, 3)
    return timings


def cuda_graph_timing(torch, work: Callable[[], object]) -> dict:
    """`work` captured as a CUDA graph (warmed up on a side stream, as capture wants) and replayed; or why it could not be."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            work()
    except RuntimeError as error:  # a measurement, not a check: record why, keep the other numbers
        return {"cuda_graph": f"not capturable: {error}"}
    return {"cuda_graph_ms": median_ms(torch, graph.replay)}


def compaction_against_gather(torch, rows: int = 32, length: int = 128, hidden_size: int = 384) -> dict:
    """The compaction plan's cudaMemcpy2DAsync copies against torch's gather (index_select + slice) on the same data."""
    from pcee.runtime.backends.cuda_memory import Allocations, plan_compaction, row_extents

    cuda = require_cuda_runtime()
    rng = np.random.default_rng(2)
    lengths = rng.integers(8, length + 1, size=rows)
    keep = rng.random(rows) < 0.6
    keep[0] = True
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    plan = plan_compaction(keep, row_extents(mask), length, hidden_size * 4, 4)
    hidden = torch.randn(rows, length, hidden_size, device="cuda")
    target = torch.empty(plan.rows, plan.sequence_length, hidden_size, device="cuda")
    kept = torch.as_tensor(np.flatnonzero(keep), device="cuda")
    torch.cuda.synchronize()  # the copies run on a stream of their own, which does not wait for torch's
    memory = Allocations(cuda)
    try:
        stream = memory.stream()

        def copies() -> None:
            cuda.enqueue_copies(plan.hidden_copies, hidden.data_ptr(), target.data_ptr(), stream)
            cuda.synchronize(stream)

        timings = {
            "copies_2d": len(plan.hidden_copies),
            "plan_2d_copies_ms": median_ms(torch, copies),
            "gather_kernel_ms": median_ms(
                torch, lambda: hidden.index_select(0, kept)[:, : plan.sequence_length].contiguous()
            ),
        }
        same = bool(torch.equal(target, hidden.index_select(0, kept)[:, : plan.sequence_length]))
    finally:
        memory.free_all()
    return {
        "rows": rows,
        "kept": plan.rows,
        "sequence_length": length,
        "hidden_size": hidden_size,
        **timings,
        "identical": same,
        "passed": same,
    }


def minilm_shaped_model():
    """A random model of MiniLM's shape (6 layers, hidden 384, 12 heads): the timings of a real deployment's size."""
    from transformers import AutoConfig

    from pcee.exporter.graph_export import prepare_for_export
    from pcee.modeling.config import PceeConfig
    from pcee.modeling.model import MultiExitClassifier

    config = AutoConfig.for_model(
        "bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    return prepare_for_export(MultiExitClassifier(config, PceeConfig(num_labels=2))).cuda()


def torch_measurements(model_dir: str | None) -> dict:
    skip_unless_empty(missing_for_torch_stages(model_dir is not None))
    torch = require_torch_cuda()
    models = {"tiny_bundle_model": bundle_model(model_dir), "minilm_shaped": minilm_shaped_model()}
    result = {
        name: {f"batch_{rows}": chain_against_single_pass(torch, model, rows, 64) for rows in (1, 32)}
        for name, model in models.items()
    }
    result["compaction"] = compaction_against_gather(torch)
    result["passed"] = result["compaction"]["passed"]
    return result


def pytest_stage(environment_variables: dict) -> dict:
    skip_unless_empty(missing_cuda())
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "tests/test_runtime_gpu_backends.py",
    ]
    completed = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env=environment_variables, timeout=300
    )
    return {
        "returncode": completed.returncode,
        "tail": completed.stdout[-3000:],
        "passed": completed.returncode in (0, 5),
    }


# -- main ----------------------------------------------------------------------------------------------
def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the stages, and why each would be skipped here; run nothing",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        help="an existing bundle to check (copied; engines are built into the copy when missing)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="with --bundle: the model directory it was exported from (for the torch stages)",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where the bundle copy goes (default: a temporary directory)"
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--texts", type=int, default=64, help="how many generated texts to compare on")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="batch limit of TensorRT engines built (or emulated) here",
    )
    parser.add_argument(
        "--rebuild-engines", action="store_true", help="build TensorRT engines even when the bundle has some"
    )
    parser.add_argument("--no-pytest", action="store_true", help="skip the gpu-marked tests")
    parser.add_argument(
        "--prepare-bundle", type=Path, help=argparse.SUPPRESS
    )  # the subprocess that builds the tiny bundle
    return parser.parse_args(argv)


def check(arguments: argparse.Namespace, environment_variables: dict) -> dict:
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"backends": {}}
    run_stage(summary, "environment", environment)
    run_stage(summary, "device_memory", device_memory_check)
    bundle_info = run_stage(summary, "bundle", bundle_stage, arguments, work_dir, environment_variables)
    if bundle_info:
        bundle, model_dir = Path(bundle_info["path"]), bundle_info["model_dir"]
        run_stage(summary, "tensorrt_engines", engines_stage, bundle, arguments)
        texts = sentences(arguments.texts, seed=0)
        for backend in ("tensorrt", "onnxruntime-cuda"):
            run_stage(summary["backends"], backend, backend_stage, backend, bundle, texts)
        # From here on torch is imported.
        run_stage(
            summary["backends"],
            EMULATED,
            emulated_stage,
            bundle,
            model_dir,
            texts,
            arguments.max_batch_size,
            work_dir,
        )
        run_stage(summary, "torch_measurements", torch_measurements, model_dir)
    if not arguments.no_pytest:
        run_stage(summary, "pytest_gpu", pytest_stage, environment_variables)
    return summary


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    environment_variables = make_pcee_importable()
    if arguments.prepare_bundle:
        prepare_tiny_bundle(arguments.prepare_bundle)
        return 0
    started = time.perf_counter()
    summary = dry_run(arguments) if arguments.dry_run else check(arguments, environment_variables)
    if not arguments.dry_run:
        summary.update(verdict(summary))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if arguments.json_out:
        arguments.json_out.parent.mkdir(parents=True, exist_ok=True)
        arguments.json_out.write_text(text + "\n")
    return 0 if arguments.dry_run or summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
