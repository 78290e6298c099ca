"""Does the compiled single-row graph exit where the chain exits? Every row of a data file, one at a time.

python -m pcee.benchmarks.single_row_check runs/demo/sst2-pcee --data data/glue/SST-2/dev.tsv
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pcee.runtime import BUDGETED_POLICY, EarlyExitRuntime, OperatingPoint, PceeError

from .profile_batch1 import CONTEXT, bundle_and_sentences, encoded_sentences


@click.command(context_settings=CONTEXT)
@bundle_and_sentences
@click.option("--rows", default=100_000, type=click.IntRange(min=1), help="At most this many sentences.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def main(bundle_dir: Path, data: Path, rows: int, no_progress: bool) -> None:
    """Compare the compiled single-row graph with the chain on every row, at every point worth checking.

    \b
    Points: every saved operating point of the bundle, each also as a cross-layer
    ensemble; the max-probability and (with a learned score) learned-score rules
    at thresholds taken from the data; PABEE at every patience; budgeted exit at
    every layer; the full model. Prints one JSON object: per point, the rows whose
    exit layer or label differ (must be 0) and the largest probability difference.
    """
    try:
        report = check(bundle_dir, data, rows, not no_progress)
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(report, indent=2))
    if report["rows_that_differ"]:
        raise SystemExit(1)


def check(bundle_dir: Path, data: Path, rows: int, progress: bool) -> dict:
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend="onnxruntime-cpu", intra_op_threads=1)
    batch = encoded_sentences(runtime, data, rows)
    singles = [batch.select(np.array([row])) for row in range(len(batch))]
    points = points_to_check(runtime, batch)
    results = {}
    for point in tqdm(points, desc="points", disable=not progress):
        chain = predictions(runtime, point, singles, compiled=False)
        compiled = predictions(runtime, point, singles, compiled=True)
        differ = (chain[0] != compiled[0]) | (chain[1] != compiled[1])
        label = point.describe() if point.name is None else f"{point.name}: {point.describe()}"
        results[label] = {
            "rows_that_differ": int(differ.sum()),
            "max_probability_difference": float(np.abs(chain[2] - compiled[2]).max()),
            "mean_exit_layer": round(float(chain[0].mean()), 4),
        }
    return {
        "bundle": str(bundle_dir),
        "rows": len(singles),
        "points": len(points),
        "rows_that_differ": sum(entry["rows_that_differ"] for entry in results.values()),
        "per_point": results,
    }


def points_to_check(runtime: EarlyExitRuntime, batch) -> list[OperatingPoint]:
    layers = runtime.num_layers
    saved = list(runtime.manifest.operating_points) or [runtime.operating_point]
    points = saved + [
        OperatingPoint(**{**p.to_dict(), "ensemble": True}) for p in saved if p.policy == "pcee"
    ]
    sample = runtime.run_all_exits(batch)
    for quantile in (0.3, 0.6):
        probability = float(np.quantile(sample.max_probability, quantile, method="nearest"))
        points.append(OperatingPoint("pcee-maxprob", tau=probability, patience=2))
        if sample.confidence_score is not None:
            score = float(np.quantile(sample.confidence_score, quantile, method="nearest"))
            points.append(OperatingPoint("pcee-learned", tau=score, patience=1))
    points += [OperatingPoint("pabee", patience=p) for p in range(1, layers)]
    points += [OperatingPoint(BUDGETED_POLICY, layer=layer) for layer in range(1, layers)]
    return points + [OperatingPoint("full")]


def predictions(runtime: EarlyExitRuntime, point: OperatingPoint, singles, compiled: bool):
    runtime.backend.use_single_row_graph = compiled
    try:
        results = [runtime.predict_encoded(row, point).predictions[0] for row in singles]
    finally:
        runtime.backend.use_single_row_graph = True
    return (
        np.array([r.exit_layer for r in results]),
        np.array([r.label for r in results]),
        np.array([r.probabilities for r in results]),
    )


if __name__ == "__main__":
    main()
