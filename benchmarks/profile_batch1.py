"""Where batch-1 time goes: onnxruntime calls versus the runtime's Python, next to the single graph.

    python -m pcee.benchmarks.profile_batch1 BUNDLE_DIR GLUE_TSV [ROWS]

BUNDLE_DIR needs onnx/full_model.onnx (pcee-export --with-full-graph); GLUE_TSV is a file whose
first column holds the sentences (e.g. SST-2 dev.tsv).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from pcee.runtime import EarlyExitRuntime, OperatingPoint
from pcee.runtime.backends.onnxruntime_cpu import cpu_session_options


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
    runtime = EarlyExitRuntime.from_bundle(bundle_dir)
    single = ort.InferenceSession(f"{bundle_dir}/onnx/full_model.onnx", cpu_session_options(), providers=["CPUExecutionProvider"])
    texts = [line.split("\t")[0] for line in open(tsv, encoding="utf-8").read().splitlines()[1 : rows + 1]]
    batch = runtime.tokenizer.encode_texts(texts)
    singles = [batch.select(np.array([index])) for index in range(len(texts))]
    contenders = {
        "single-graph ONNX": lambda row: single.run(None, {name: getattr(row, name) for name in ("input_ids", "attention_mask", "token_type_ids")}),
        "runtime, all layers": lambda row: runtime.predict_encoded(row, OperatingPoint("full")),
        "runtime, operating point": lambda row: runtime.predict_encoded(row),
    }
    results = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            with SessionClock() as clock:
                started = time.perf_counter()
                for row in singles:
                    run(row)
                total = time.perf_counter() - started
            results[name].append((total, clock.seconds))
    for name, runs in results.items():
        total = statistics.median(t for t, _ in runs) / len(singles) * 1000
        inside = statistics.median(o for _, o in runs) / len(singles) * 1000
        print(f"{name:26s} {total:.3f} ms/row, {inside:.3f} in onnxruntime, {total - inside:.3f} in Python")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(value) for value in sys.argv[3:4]))
