"""Evaluate a bundle through the real runtime (early exit, not simulation) on labelled rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pcee.modeling.metrics import task_metric
from pcee.runtime import EarlyExitRuntime, EncodedBatch, OperatingPoint

from .bound import FULL_MODEL
from .calibrate import holdout_split
from .collect import data_sha256
from .errors import CalibrationError
from .simulate import exit_histogram


def requested_point(
    runtime: EarlyExitRuntime,
    default: OperatingPoint,
    point_name: str | None,
    policy: str | None,
    tau: float | None,
    patience: int | None,
    layer: int | None,
) -> OperatingPoint:
    """A new point when a policy is given; otherwise `default` (or the named point) with any knob overridden."""
    if policy is not None:
        return OperatingPoint(policy, tau=tau, patience=patience, layer=layer)
    base = default if point_name is None else runtime.resolve_operating_point(point_name)
    overrides = {
        name: value
        for name, value in (("tau", tau), ("patience", patience), ("layer", layer))
        if value is not None
    }
    return replace(base, **overrides)


def held_out_rows(report: dict, batch: EncodedBatch) -> np.ndarray:
    """The rows a calibration held out of its search, found again by its seed and fraction in the same data."""
    try:
        name, data = report["operating_point"]["name"], report["data"]
        if data_sha256(batch) != data["sha256"]:
            raise CalibrationError(
                f"--data is not the data point {name!r} was calibrated on ({data['source']}, {data['rows']} rows; compared "
                "after tokenization); give that data to evaluate the rows its calibration held out"
            )
        return holdout_split(len(batch), report["holdout_fraction"], report["seed"])[1]
    except (KeyError, TypeError) as error:
        raise CalibrationError(
            f"the calibration report has no usable hold-out split ({error!r}); calibrate the point again"
        ) from None


def run_point(
    runtime: EarlyExitRuntime, batch: EncodedBatch, labels: np.ndarray, point: OperatingPoint, batch_size: int
) -> dict:
    result = runtime.predict_encoded(batch, point, batch_size)
    predictions = np.array([row.label_index for row in result.predictions])
    exit_layers = np.array([row.exit_layer for row in result.predictions])
    metric_name = runtime.manifest.model.metric
    return {
        "operating_point": result.operating_point.to_dict(),
        "rows": len(predictions),
        "layer_speedup": round(result.layer_speedup, 6),
        "metric": round(task_metric(metric_name, predictions, labels), 6),
        "metric_name": metric_name,
        "exit_histogram": exit_histogram(exit_layers, runtime.num_layers),
        "wall_time_s": round(result.elapsed_seconds, 6),
    }


def evaluate_bundle(
    runtime: EarlyExitRuntime, batch: EncodedBatch, labels: np.ndarray, point: OperatingPoint, batch_size: int
) -> dict:
    """The point's layer speed-up, metric, exit histogram and wall time; the full model's beside it."""
    # One warm-up batch first, so neither timed run pays for session start-up.
    runtime.predict_encoded(batch.select(np.arange(min(len(batch), batch_size))), FULL_MODEL, batch_size)
    evaluation = run_point(runtime, batch, labels, point, batch_size)
    full = run_point(runtime, batch, labels, FULL_MODEL, batch_size)
    evaluation["full_model"] = {"metric": full["metric"], "wall_time_s": full["wall_time_s"]}
    evaluation["wall_speedup"] = (
        round(1.0 - evaluation["wall_time_s"] / full["wall_time_s"], 6) if full["wall_time_s"] > 0 else None
    )
    evaluation["backend"] = runtime.backend_name
    return evaluation
