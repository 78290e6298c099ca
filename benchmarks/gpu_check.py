"""One-shot check of the GPU backends (TensorRT, onnxruntime CUDA) against the CPU backend; prints JSON.

Run from the repository root on a GPU machine; pcee need not be installed:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --json-out $OUT/gpu_check.json

Without --bundle it builds a tiny random 4-layer bundle in a subprocess (needs torch, transformers
and onnx there; the checking process itself never imports torch, as in production). When the
tensorrt package is present it builds TensorRT engines into a copy of the bundle. Then, per backend:
every exit of every row against the CPU backend, a fixed sequence of layer spans and device
compactions, predictions under an operating point where some rows leave early (so the rest are
compacted), concurrent callers against sequential ones, the engine-profile limit, and wall-clock
timings. It also checks the device-memory helpers on the GPU (needs cuda-python only) and, unless
--no-pytest, runs the gpu-marked tests of tests/test_gpu_backends.py.

Each stage reports ok, skipped (with the reason, e.g. a package missing) or failed (with the error);
the exit status is 0 only when no stage failed. Expect one to three minutes on a tiny bundle.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("modeling", "exporter", "runtime", "calibration", "demo")
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")
NUM_LAYERS = 4
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
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


# -- stages ------------------------------------------------------------------------------------------
def run_stage(summary: dict, name: str, function, *arguments) -> dict | None:
    """Run one stage, record its outcome under `name`; returns the stage's result (None unless ok)."""
    started = time.perf_counter()
    outcome: dict
    result = None
    try:
        result = function(*arguments)
        outcome = {"status": "ok" if result.get("passed", True) else "failed", **result}
    except Skipped as reason:
        outcome = {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # a check script reports every failure instead of stopping at the first
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=-4)}
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    summary[name] = outcome
    print(f"[gpu_check] {name}: {outcome['status']} ({outcome['seconds']} s)", file=sys.stderr)
    return result


def package_versions() -> dict[str, str]:
    names = (
        "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13",
        "cuda-python", "cuda-bindings", "torch", "transformers",
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

    from pcee.runtime.backends.cuda_memory import CudaRuntime
    from pcee.runtime.errors import BackendUnavailableError

    try:
        gpu = CudaRuntime.load().device_description()
    except BackendUnavailableError as missing:
        gpu = f"unavailable: needs {missing}"
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "packages": package_versions(),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "gpu": gpu,
    }


def require_cuda_runtime():
    from pcee.runtime.backends.cuda_memory import CudaRuntime
    from pcee.runtime.errors import BackendUnavailableError

    try:
        return CudaRuntime.load()
    except BackendUnavailableError as missing:
        raise Skipped(f"needs {missing}") from None


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
            rows, sequence, hidden_size = int(rng.integers(1, 33)), int(rng.integers(1, 130)), int(rng.integers(1, 65))
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
    """Build a tiny random bundle at `target` (runs in a subprocess: imports torch)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_model_dir

    from pcee.exporter.bundle import export_bundle

    export_bundle(make_tiny_model_dir(target.parent / "model", num_layers=NUM_LAYERS), target)


def bundle_stage(arguments: argparse.Namespace, work_dir: Path, environment_variables: dict) -> dict:
    bundle = work_dir / "bundle"
    if arguments.bundle:
        shutil.copytree(arguments.bundle, bundle)  # engines may be added: never touch the given bundle
        source = str(arguments.bundle)
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--prepare-bundle", str(bundle)]
        completed = subprocess.run(command, capture_output=True, text=True, env=environment_variables, timeout=300)
        if completed.returncode != 0:
            raise RuntimeError(f"building the tiny bundle failed: {completed.stderr[-2000:]}")
        source = "tiny random model built here"
    from pcee.runtime.manifest import Manifest

    manifest = Manifest.load(bundle)
    return {
        "path": str(bundle), "source": source, "architecture": manifest.model.architecture,
        "num_layers": manifest.model.num_layers, "precision": manifest.model.precision,
        "has_engines": manifest.tensorrt is not None,
    }


def engines_stage(bundle: Path, arguments: argparse.Namespace) -> dict:
    from pcee.runtime.manifest import Manifest

    manifest = Manifest.load(bundle)
    if manifest.tensorrt and not arguments.rebuild_engines:
        return {"built": False, "tensorrt": {key: value for key, value in manifest.tensorrt.items() if key != "engines"}}
    try:
        import tensorrt
    except ImportError:
        raise Skipped("needs the tensorrt package to build engines") from None
    from pcee.exporter.tensorrt import ShapeRange, build_engines

    shape_range = ShapeRange(arguments.max_batch_size, manifest.model.max_seq_len)
    manifest.tensorrt = build_engines(bundle, manifest.embeddings, manifest.layers, shape_range, manifest.model.precision == "fp16", False)
    manifest.save(bundle)
    return {"built": True, "tensorrt_version": tensorrt.__version__, "max_batch_size": arguments.max_batch_size}


# -- comparing a GPU backend with the CPU backend ----------------------------------------------------
def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=count)
    lengths[: max(1, count // 16)] = 200  # a few rows the tokenizer truncates
    return [" ".join(rng.choice(WORDS, size=int(length))) for length in lengths]


def max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64))))


def partial_exit_point(cpu, texts: list[str], batch_size: int):
    """PCEE (entropy) with tau in the widest gap of the middle rows: some rows leave at the patience, the rest are compacted."""
    from pcee.runtime.policies import OperatingPoint

    patience = min(2, cpu.num_layers)
    exits = cpu.run_all_exits(cpu.tokenizer.encode_texts(texts), batch_size=batch_size)
    deciding = np.sort(exits.entropy[:, :patience].max(axis=1))
    middle = range(len(deciding) // 4, max(len(deciding) // 4 + 1, 3 * len(deciding) // 4))
    widest = max(middle, key=lambda index: deciding[min(index + 1, len(deciding) - 1)] - deciding[index])
    tau = float((deciding[widest] + deciding[min(widest + 1, len(deciding) - 1)]) / 2)
    return OperatingPoint(policy="pcee", tau=min(max(tau, 0.0), 1.0), patience=patience)


def all_exits_check(gpu, cpu, texts: list[str], batch_size: int) -> dict:
    batch = cpu.tokenizer.encode_texts(texts)
    actual, expected = gpu.run_all_exits(batch, batch_size=batch_size), cpu.run_all_exits(batch, batch_size=batch_size)
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
    while done < layers:
        span = min(2, layers - done)
        for got, want in zip(gpu.backend.run_layers(gpu_state, done, span), cpu.backend.run_layers(cpu_state, done, span)):
            worst = max(worst, max_difference(got.logits, want.logits), max_difference(got.entropy, want.entropy))
        done += span
        if done < layers and keep.sum() > 1:
            lengths = batch.attention_mask[keep].sum(axis=1)
            step = rng.random(int(keep.sum())) < 0.7
            if longest_first:
                step[np.argmax(lengths)] = False
                longest_first = False
            step[np.argmin(lengths)] = True
            gpu_state, cpu_state = gpu.backend.compact(gpu_state, step), cpu.backend.compact(cpu_state, step)
            keep[np.flatnonzero(keep)[~step]] = False
    return {"rows": rows, "rows_left": int(keep.sum()), "records_max_diff": worst}


def predictions_check(gpu, cpu, texts: list[str], batch_size: int, point) -> dict:
    expected = cpu.predict(texts, operating_point=point, batch_size=batch_size)
    actual = gpu.predict(texts, operating_point=point, batch_size=batch_size)
    expected_layers = np.array([row.exit_layer for row in expected.predictions])
    actual_layers = np.array([row.exit_layer for row in actual.predictions])
    same = actual_layers == expected_layers
    probabilities = max_difference(
        np.stack([row.probabilities for row in actual.predictions])[same], np.stack([row.probabilities for row in expected.predictions])[same]
    )
    return {
        "operating_point": point.to_dict(),
        "exit_layer_histogram": np.bincount(expected_layers, minlength=cpu.num_layers + 1)[1:].tolist(),
        "exit_layer_agreement": float(same.mean()),
        "probabilities_max_diff": probabilities,
        "layer_speedup": {"gpu": actual.layer_speedup, "cpu": expected.layer_speedup},
    }


def concurrency_check(gpu, texts: list[str], batch_size: int, point, threads: int = 8) -> dict:
    workloads = [texts[start:] + texts[:start] for start in range(0, len(texts), max(1, len(texts) // threads))][:threads]
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
        and all(np.array_equal(a.probabilities, b.probabilities) for a, b in zip(result.predictions, expected.predictions))
        for index, expected in enumerate(sequential) for result in results[index]
    )
    return {"threads": len(workloads), "calls_per_thread": 3, "identical_to_sequential": identical}


def limit_check(gpu, texts: list[str]) -> dict:
    from pcee.runtime.errors import InputError

    limit = int(gpu.manifest.tensorrt["max_batch_size"])
    try:
        gpu.predict((texts * (limit + 1))[: limit + 1], batch_size=limit + 1)
    except InputError as error:
        return {"max_batch_size": limit, "refused": True, "message": str(error)}
    return {"max_batch_size": limit, "refused": False}


def median_seconds(runtime, texts: list[str], batch_size: int, repeats: int = 5) -> float:
    runtime.predict(texts, batch_size=batch_size)  # warm-up: first-call allocations and autotuning
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runtime.predict(texts, batch_size=batch_size)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 5)


def backend_stage(backend: str, bundle: Path, texts: list[str]) -> dict:
    from pcee.runtime import EarlyExitRuntime
    from pcee.runtime.errors import BackendUnavailableError

    try:
        gpu = EarlyExitRuntime.from_bundle(bundle, backend=backend)
    except BackendUnavailableError as missing:
        raise Skipped(str(missing)) from None
    with gpu, EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu") as cpu:
        engines = gpu.manifest.tensorrt or {}
        batch_size = min(16, int(engines.get("max_batch_size", 16))) if backend == "tensorrt" else 16
        half = gpu.manifest.model.precision == "fp16" or bool(engines.get("fp16") and backend == "tensorrt")
        tolerance = 3e-2 if half else 5e-3  # TF32 matmuls (the GPU default) move fp32 outputs by ~1e-3
        result = {"device": gpu.device, "batch_size": batch_size, "tolerance": tolerance}
        result["all_exits"] = all_exits_check(gpu, cpu, texts, batch_size)
        result["compaction"] = compaction_check(gpu, cpu, texts, batch_size)
        point = partial_exit_point(cpu, texts, batch_size)
        result["predictions"] = predictions_check(gpu, cpu, texts, batch_size, point)
        result["concurrency"] = concurrency_check(gpu, texts, batch_size, point)
        if backend == "tensorrt":
            result["limit"] = limit_check(gpu, texts)
        result["median_predict_seconds"] = {"gpu": median_seconds(gpu, texts, batch_size), "cpu": median_seconds(cpu, texts, batch_size)}
    result["passed"] = bool(
        max(result["all_exits"].values()) <= tolerance
        and result["compaction"]["records_max_diff"] <= tolerance
        and result["predictions"]["exit_layer_agreement"] >= 0.97  # TF32 may flip a row sitting on tau
        and result["predictions"]["probabilities_max_diff"] <= tolerance
        and result["concurrency"]["identical_to_sequential"]
        and result.get("limit", {"refused": True})["refused"]
    )
    return result


def pytest_stage(environment_variables: dict) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu_backends.py"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment_variables, timeout=300)
    return {"returncode": completed.returncode, "tail": completed.stdout[-3000:], "passed": completed.returncode in (0, 5)}


# -- main ----------------------------------------------------------------------------------------------
def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="an existing bundle to check (copied; engines are built into the copy when missing)")
    parser.add_argument("--work-dir", type=Path, help="where the bundle copy goes (default: a temporary directory)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--texts", type=int, default=64, help="how many generated texts to compare on")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batch limit of TensorRT engines built here")
    parser.add_argument("--rebuild-engines", action="store_true", help="build TensorRT engines even when the bundle has some")
    parser.add_argument("--no-pytest", action="store_true", help="skip the gpu-marked tests")
    parser.add_argument("--prepare-bundle", type=Path, help=argparse.SUPPRESS)  # the subprocess that builds the tiny bundle
    return parser.parse_args()


def main() -> int:
    arguments = parse_arguments()
    environment_variables = make_pcee_importable()
    if arguments.prepare_bundle:
        prepare_tiny_bundle(arguments.prepare_bundle)
        return 0
    started = time.perf_counter()
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    run_stage(summary, "environment", environment)
    run_stage(summary, "device_memory", device_memory_check)
    bundle_info = run_stage(summary, "bundle", bundle_stage, arguments, work_dir, environment_variables)
    if bundle_info:
        bundle = Path(bundle_info["path"])
        run_stage(summary, "tensorrt_engines", engines_stage, bundle, arguments)
        texts = sentences(arguments.texts, seed=0)
        summary["backends"] = {}
        for backend in GPU_BACKENDS:
            run_stage(summary["backends"], backend, backend_stage, backend, bundle, texts)
    if not arguments.no_pytest:
        run_stage(summary, "pytest_gpu", pytest_stage, environment_variables)
    stages = [*summary.values(), *summary.get("backends", {}).values()]
    failed = any(stage.get("status") == "failed" for stage in stages)
    summary["gpu_backends_checked"] = [name for name, stage in summary.get("backends", {}).items() if stage["status"] != "skipped"]
    summary["ok"] = not failed
    summary["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if arguments.json_out:
        arguments.json_out.parent.mkdir(parents=True, exist_ok=True)
        arguments.json_out.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
