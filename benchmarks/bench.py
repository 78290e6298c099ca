"""Side-by-side wall-clock measurements: every contender on the same rows, interleaved, in one process.

Ratios measured this way survive a noisy shared machine; absolute times do not.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pcee.runtime import graphs
from pcee.runtime.backends.onnxruntime_cpu import cpu_session_options, open_session
from pcee.runtime.engine import EarlyExitRuntime
from pcee.runtime.policies import OperatingPoint
from pcee.runtime.tokenization import EncodedBatch

RunChunk = Callable[[EncodedBatch], int]  # runs one chunk, returns the layers it ran (0 when not layer-based)


@dataclass
class Contender:
    name: str
    run: RunChunk
    layer_based: bool = True


@dataclass
class Timing:
    chunk_seconds: list[list[float]]  # per repeat, per chunk
    layers_run: int

    def total_seconds(self) -> float:
        """Median over repeats of one pass over all rows."""
        return statistics.median(sum(chunks) for chunks in self.chunk_seconds)


def chunks_of(batch: EncodedBatch, batch_size: int) -> list[EncodedBatch]:
    """Consecutive rows in data order, each chunk padded to its own longest row."""
    return [batch.select(np.arange(start, min(start + batch_size, len(batch)))) for start in range(0, len(batch), batch_size)]


def runtime_contender(name: str, runtime: EarlyExitRuntime, point: OperatingPoint, batch_size: int) -> Contender:
    def run(chunk: EncodedBatch) -> int:
        return runtime.predict_encoded(chunk, point, batch_size).layers_run

    return Contender(name, run)


def single_graph_contender(path: Path, intra_op_threads: int | None) -> Contender:
    session = open_session(path, cpu_session_options(intra_op_threads), ["CPUExecutionProvider"])
    input_names = [tensor.name for tensor in session.get_inputs()]

    def run(chunk: EncodedBatch) -> int:
        session.run([graphs.LOGITS], {name: getattr(chunk, name) for name in input_names})
        return 0

    return Contender("single_graph_onnx", run, layer_based=False)


def torch_contender(model_dir: Path) -> Contender | None:
    try:
        import torch

        from pcee.modeling.model import MultiExitClassifier
    except ImportError:
        return None
    model = MultiExitClassifier.from_pretrained(model_dir)

    def run(chunk: EncodedBatch) -> int:
        with torch.inference_mode():
            model(*(torch.from_numpy(array) for array in (chunk.input_ids, chunk.attention_mask, chunk.token_type_ids)))
        return 0

    return Contender("pytorch_eager", run, layer_based=False)


def measure(contenders: list[Contender], chunks: list[EncodedBatch], repeats: int, progress=None) -> dict[str, Timing]:
    """Repeat r runs every contender over all chunks before repeat r+1 starts, so drift hits all alike."""
    timings = {contender.name: Timing([], 0) for contender in contenders}
    for contender in contenders:  # warm-up: first calls allocate and JIT
        contender.run(chunks[0])
    for _ in range(repeats):
        for contender in contenders:
            seconds, layers = [], 0
            for chunk in chunks:
                started = time.perf_counter()
                layers += contender.run(chunk)
                seconds.append(time.perf_counter() - started)
            timings[contender.name].chunk_seconds.append(seconds)
            timings[contender.name].layers_run = layers
            if progress is not None:
                progress.update(1)
    return timings


def summarize(timings: dict[str, Timing], contenders: list[Contender], rows: int, batch_size: int, num_layers: int, reference: str = "single_graph_onnx") -> dict:
    base = timings[reference].total_seconds()
    figures = {}
    for contender in contenders:
        timing = timings[contender.name]
        total = timing.total_seconds()
        entry = {"seconds_per_pass": round(total, 4), "rows_per_second": round(rows / total, 2), "wall_speedup": round(1 - total / base, 4)}
        if batch_size == 1:
            latencies = np.concatenate(timing.chunk_seconds) * 1000
            entry.update(p50_ms=round(float(np.percentile(latencies, 50)), 3), p99_ms=round(float(np.percentile(latencies, 99)), 3))
        if contender.layer_based:
            layer_speedup = 1 - timing.layers_run / (rows * num_layers)
            entry["layer_speedup"] = round(layer_speedup, 4)
            if layer_speedup > 0:
                entry["efficiency"] = round(entry["wall_speedup"] / layer_speedup, 4)
        figures[contender.name] = entry
    if "runtime_all_layers" in timings:
        figures["chain_overhead"] = round(timings["runtime_all_layers"].total_seconds() / base, 4)
    if "runtime_operating_point" in timings:
        figures["throughput_vs_single_graph"] = round(base / timings["runtime_operating_point"].total_seconds(), 4)
    return figures
