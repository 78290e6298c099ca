"""Where batch-1 time goes: onnxruntime calls versus the runtime's Python, next to the single graph.

    python -m pcee.benchmarks.profile_batch1 BUNDLE_DIR GLUE_TSV [ROWS]

BUNDLE_DIR needs its own single-graph model (pcee-export --with-full-graph); GLUE_TSV is a file
whose first column holds the sentences, e.g. data/glue/SST-2/dev.tsv.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pcee.runtime import EarlyExitRuntime, OperatingPoint, PceeError

from .bench import OPERATING_POINT, Contender, runtime_contender, single_graph_contender, single_graph_for


class SessionClock:
    """Wraps InferenceSession.run to add up the time spent inside onnxruntime."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = ort.InferenceSession.run

    def __enter__(self) -> "SessionClock":
        original = self.original

        def timed(session, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(session, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        ort.InferenceSession.run = timed
        return self

    def __exit__(self, *exc) -> None:
        ort.InferenceSession.run = self.original


def main(bundle_dir: str, tsv: str, rows: int = 400, repeats: int = 3) -> None:
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend="onnxruntime-cpu")
    single_graph = single_graph_for(Path(bundle_dir), runtime.manifest)
    texts = [line.split("\t")[0] for line in open(tsv, encoding="utf-8").read().splitlines()[1 : rows + 1]]
    batch = runtime.tokenizer.encode_texts(texts)
    singles = [batch.select(np.array([index])) for index in range(len(texts))]
    contenders = [
        single_graph_contender(single_graph.path, None),
        runtime_contender("runtime_all_layers", runtime, OperatingPoint("full"), 1),
        runtime_contender(OPERATING_POINT, runtime, runtime.operating_point, 1),
    ]
    results: dict[str, list[tuple[float, float]]] = {contender.name: [] for contender in contenders}
    for _ in range(repeats):
        for contender in contenders:
            results[contender.name].append(time_rows(contender, singles))
    for name, runs in results.items():
        total = statistics.median(t for t, _ in runs) / len(singles) * 1000
        inside = statistics.median(o for _, o in runs) / len(singles) * 1000
        print(f"{name:26s} {total:.3f} ms/row, {inside:.3f} in onnxruntime, {total - inside:.3f} in Python")


def time_rows(contender: Contender, rows: list) -> tuple[float, float]:
    """Seconds for all rows one at a time, and the part of it spent inside onnxruntime."""
    with SessionClock() as clock:
        started = time.perf_counter()
        for row in rows:
            contender.run(row)
        return time.perf_counter() - started, clock.seconds


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2], *(int(value) for value in sys.argv[3:4]))
    except PceeError as error:
        sys.exit(f"Error: {error}")
