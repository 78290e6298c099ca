"""Side-by-side wall-clock measurements: every contender on the same rows, interleaved, in one process.

Ratios measured this way survive a noisy shared machine; absolute times do not.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcee.runtime import (
    EarlyExitRuntime,
    EncodedBatch,
    Manifest,
    OperatingPoint,
    PceeError,
    SingleGraphSession,
    layer_speedup,
    replace_directory,
    sha256_of,
    staging_directory_for,
)

RunChunk = Callable[[EncodedBatch], int]  # runs one chunk, returns the layers it ran (0 when not layer-based)
SINGLE_GRAPH_FILE = "full_model.onnx"
PLAIN_SINGLE_GRAPH = "single_graph_onnx"
ALL_LAYERS = "runtime_all_layers"
OPERATING_POINT = "runtime_operating_point"  # the bundle's default point
SAVED_POINT = "runtime_point_"  # + the name of a saved point measured with --points


class BenchmarkError(PceeError, ValueError):
    """A benchmark cannot run as asked; the message says what is missing and what to do."""


@dataclass
class Contender:
    name: str
    run: RunChunk
    layer_based: bool = True
    # Entered around each of its passes: process-wide knobs (torch's thread count) hold only while it runs.
    settings: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    precision: str = (
        "fp32"  # layer-based contenders are compared with the fastest single graph of their precision
    )
    single_graph: bool = False  # one ONNX graph of the whole network: a candidate reference


@dataclass
class Timing:
    chunk_seconds: list[list[float]]  # per repeat, per chunk
    layers_run: int

    def total_seconds(self) -> float:
        """Median over repeats of one pass over all rows."""
        return statistics.median(sum(chunks) for chunks in self.chunk_seconds)


def chunks_of(batch: EncodedBatch, batch_size: int) -> list[EncodedBatch]:
    """Consecutive rows in data order, each chunk padded to its own longest row."""
    return [
        batch.select(np.arange(start, min(start + batch_size, len(batch))))
        for start in range(0, len(batch), batch_size)
    ]


def runtime_contender(
    name: str, runtime: EarlyExitRuntime, point: OperatingPoint, batch_size: int
) -> Contender:
    def run(chunk: EncodedBatch) -> int:
        return runtime.predict_encoded(chunk, point, batch_size).layers_run

    return Contender(name, run, precision=runtime.manifest.model.precision)


def single_graph_contender(
    path: Path, intra_op_threads: int | None, name: str = PLAIN_SINGLE_GRAPH, precision: str = "fp32"
) -> Contender:
    graph = SingleGraphSession(path, intra_op_threads)

    def run(chunk: EncodedBatch) -> int:
        graph.logits(chunk)
        return 0

    return Contender(name, run, layer_based=False, precision=precision, single_graph=True)


def torch_contender(model_dir: Path, intra_op_threads: int | None) -> Contender:
    """The PyTorch model at full depth, on `intra_op_threads` torch threads while it runs (default: torch's own)."""
    import torch

    from pcee.modeling.model import MultiExitClassifier

    model = MultiExitClassifier.from_pretrained(model_dir)

    def run(chunk: EncodedBatch) -> int:
        with torch.inference_mode():
            model(
                *(
                    torch.from_numpy(array)
                    for array in (chunk.input_ids, chunk.attention_mask, chunk.token_type_ids)
                )
            )
        return 0

    return Contender(
        "pytorch_eager", run, layer_based=False, settings=functools.partial(torch_threads, intra_op_threads)
    )


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` and then restored (it is process-wide).

    Inter-op threads are left alone: torch accepts that setting once per process, before any
    parallel work, and eager inference of one model does not use them.
    """
    import torch

    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: the calling thread's CPU time


def measure(
    contenders: list[Contender], chunks: list[EncodedBatch], repeats: int, progress=None, clock: str = "wall"
) -> dict[str, Timing]:
    """Repeat r runs every contender over all chunks before repeat r+1 starts, so drift hits all alike."""
    timings = {contender.name: Timing([], 0) for contender in contenders}
    for contender in contenders:  # warm-up: first calls allocate and JIT
        with contender.settings():
            contender.run(chunks[0])
    for _ in range(repeats):
        for contender in contenders:
            with contender.settings():
                seconds, layers = timed_pass(contender, chunks, CLOCKS[clock])
            timings[contender.name].chunk_seconds.append(seconds)
            timings[contender.name].layers_run = layers
            if progress is not None:
                progress.update(1)
    return timings


def timed_pass(
    contender: Contender, chunks: list[EncodedBatch], now: Callable[[], float] = time.perf_counter
) -> tuple[list[float], int]:
    """Seconds per chunk (by the clock `now`) and the layers run over one pass of `contender` over every chunk."""
    seconds, layers = [], 0
    for chunk in chunks:
        started = now()
        layers += contender.run(chunk)
        seconds.append(now() - started)
    return seconds, layers


def strongest_single_graphs(timings: dict[str, Timing], contenders: list[Contender]) -> dict[str, str]:
    """Per precision, the name of the fastest single graph measured in this run."""
    strongest: dict[str, str] = {}
    for contender in contenders:
        best = strongest.get(contender.precision)
        if contender.single_graph and (
            best is None or timings[contender.name].total_seconds() < timings[best].total_seconds()
        ):
            strongest[contender.precision] = contender.name
    return strongest


def summarize(
    timings: dict[str, Timing],
    contenders: list[Contender],
    rows: int,
    batch_size: int,
    num_layers: int,
    reference: str | None = None,
) -> dict:
    """Each contender's figures; its wall speed-up against `reference`, by default the fastest single graph of its precision.

    `versus_plain` is the contender's rows/s as a multiple of the plain (unfused float) single graph's.
    A chain contender's `throughput_vs_single_graph` (reference time / its time) and a chain's `chain_overhead`
    use that reference too.
    """
    strongest = strongest_single_graphs(timings, contenders)
    plain = timings[PLAIN_SINGLE_GRAPH].total_seconds() if PLAIN_SINGLE_GRAPH in timings else None
    figures = {}
    for contender in contenders:
        timing = timings[contender.name]
        total = timing.total_seconds()
        against = reference or strongest.get(contender.precision, strongest.get("fp32", PLAIN_SINGLE_GRAPH))
        base = timings[against].total_seconds()
        entry = {
            "seconds_per_pass": round(total, 4),
            "rows_per_second": round(rows / total, 2),
            "reference": against,
            "wall_speedup": round(1 - total / base, 4),
        }
        if plain is not None:
            entry["versus_plain"] = round(plain / total, 4)
        if batch_size == 1:
            latencies = np.concatenate(timing.chunk_seconds) * 1000
            entry.update(
                p50_ms=round(float(np.percentile(latencies, 50)), 3),
                p99_ms=round(float(np.percentile(latencies, 99)), 3),
            )
        if contender.layer_based:
            saved = layer_speedup(timing.layers_run, rows, num_layers)
            entry.update(layer_speedup=round(saved, 4), throughput_vs_single_graph=round(base / total, 4))
            if saved > 0:
                entry["efficiency"] = round(entry["wall_speedup"] / saved, 4)
        figures[contender.name] = entry
    figures.update(chain_figures(figures, timings))
    return figures


def chain_figures(figures: dict, timings: dict[str, Timing]) -> dict:
    """chain_overhead per chain: its all-layers time over its reference's.

    A chain's all-layers contender is named runtime_all_layers, with an "@label" suffix for every chain after the first.
    """
    return {
        f"chain_overhead{name[len(ALL_LAYERS) :]}": round(
            timings[name].total_seconds() / timings[figures[name]["reference"]].total_seconds(), 4
        )
        for name in timings
        if name.startswith(ALL_LAYERS)
    }


# -- the single-graph reference ----------------------------------------------------------------------


@dataclass(frozen=True)
class SingleGraph:
    """The whole network as one ONNX graph, and where it came from: "bundle", "cache" or "exported" (just now)."""

    path: Path
    origin: str


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/pcee, else ~/.cache/pcee (the XDG base directory rule: a relative XDG_CACHE_HOME is ignored)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "pcee"


def single_graph_for(
    bundle_dir: Path, manifest: Manifest, model_dir: Path | None = None, cache_dir: Path | None = None
) -> SingleGraph:
    """The bundle's own single graph, else the one exported from `model_dir` into the cache (once per model)."""
    if manifest.full_graph is not None:
        return SingleGraph(bundle_dir / manifest.full_graph.file, "bundle")
    if model_dir is None:
        raise BenchmarkError(
            f"{bundle_dir} has no single-graph model to compare against (it was exported without --with-full-graph): "
            "give the model directory it was exported from (pcee-bench --model-dir MODEL_DIR), "
            "or re-export the bundle with pcee-export --with-full-graph"
        )
    return cached_single_graph(model_dir, cache_dir or default_cache_dir())


def cached_single_graph(
    model_dir: Path, cache_dir: Path, fuse: bool = False, num_layers: int | None = None
) -> SingleGraph:
    """Exported once per model (fusion, truncation) into `cache_dir`/single-graph/<model hash>[-fused][-Nlayers]/.

    Never into the bundle. `num_layers` cuts the model to its first layers and their exit.
    """
    suffix = ("-fused" if fuse else "") + (f"-{num_layers}layers" if num_layers else "")
    entry = cache_dir / "single-graph" / (model_dir_sha256(model_dir)[:16] + suffix)
    if (entry / SINGLE_GRAPH_FILE).is_file():
        return SingleGraph(entry / SINGLE_GRAPH_FILE, "cache")
    from pcee.exporter.graph_export import export_full_graph

    try:
        staging = staging_directory_for(entry)
    except OSError as error:
        raise BenchmarkError(
            f"cannot write the single-graph cache under {cache_dir} ({error}); pass --cache-dir a writable directory"
        ) from None
    try:
        export_full_graph(model_dir, staging / SINGLE_GRAPH_FILE, fuse=fuse, num_layers=num_layers)
        replace_directory(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SingleGraph(entry / SINGLE_GRAPH_FILE, "exported")


def model_dir_sha256(model_dir: Path) -> str:
    """One hash over the files that define the model's arithmetic: its config.json and weights."""
    from pcee.modeling.model import CONFIG_NAME, REFERENCE_WEIGHT_NAMES

    files = {
        name: sha256_of(model_dir / name)
        for name in (CONFIG_NAME, *REFERENCE_WEIGHT_NAMES)
        if (model_dir / name).is_file()
    }
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


# -- the single graph as users ship it ---------------------------------------------------------------


@dataclass(frozen=True)
class SingleGraphVariant:
    name: str
    precision: str
    path: Path


def single_graph_variants(
    plain: SingleGraph, fused: SingleGraph | None, quantize: str | None, workdir: Path
) -> list[SingleGraphVariant]:
    """The plain single graph; onnxruntime's transformer optimizer on it (what Optimum's O2 ships); the graph
    exported with pcee's fused attention (`fused`, when a model directory was given); with `quantize`, each
    optimized graph dynamically quantized as well. Derived graphs are written to `workdir`.
    """
    from pcee.exporter.optimize import Fusion, fuse_graph

    optimized = workdir / "optimized.onnx"
    shutil.copyfile(plain.path, optimized)
    fuse_graph(optimized, Fusion(num_heads=0, hidden_size=0), as_optimum_o2=True)  # 0, 0: read off the graph
    variants = [
        SingleGraphVariant(PLAIN_SINGLE_GRAPH, "fp32", plain.path),
        SingleGraphVariant("single_graph_optimized", "fp32", optimized),
    ]
    if fused is not None:
        variants.append(SingleGraphVariant("single_graph_fused", "fp32", fused.path))
    if quantize:
        for variant in variants[1:]:
            quantized = quantized_copy(variant.path, workdir / f"{variant.name}.{quantize}.onnx")
            variants.append(SingleGraphVariant(f"{variant.name}_{quantize}", quantize, quantized))
    return variants


def quantized_copy(path: Path, destination: Path) -> Path:
    """The single graph at `path` dynamically quantized to int8 at `destination`: the int8 reference."""
    from pcee.exporter.optimize import quantize_graph

    shutil.copyfile(path, destination)
    quantize_graph(destination, float_exit_head=False)
    return destination
