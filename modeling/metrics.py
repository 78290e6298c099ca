"""GLUE classification metrics from their formulas: accuracy, binary F1, Matthews correlation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from pcee.runtime import PceeError


class MetricError(PceeError, ValueError):
    """A metric was asked for by an unknown name, or for predictions that do not pair up with the labels."""


def _as_label_arrays(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = np.asarray(preds).ravel(), np.asarray(labels).ravel()
    if preds.shape != labels.shape:
        raise MetricError(
            f"got {preds.size} predictions for {labels.size} labels; expected one prediction per label. "
            "Score the predictions of exactly the labelled rows."
        )
    if preds.size == 0:
        raise MetricError("got no predictions; expected at least one. Score a non-empty set of rows.")
    return preds, labels


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the label."""
    preds, labels = _as_label_arrays(preds, labels)
    return float(np.mean(preds == labels))


def f1_binary(preds: ArrayLike, labels: ArrayLike) -> float:
    """F1 of the positive class 1: 2*TP / (2*TP + FP + FN); 0.0 when there is no positive at all."""
    preds, labels = _as_label_arrays(preds, labels)
    predicted_positive, actual_positive = preds == 1, labels == 1
    true_positives = np.sum(predicted_positive & actual_positive)
    denominator = np.sum(predicted_positive) + np.sum(actual_positive)
    return float(2 * true_positives / denominator) if denominator else 0.0


def matthews_corrcoef(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation (multi-class form, equal to the binary one for two classes); 0.0 when undefined."""
    preds, labels = _as_label_arrays(preds, labels)
    classes = np.union1d(preds, labels)
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, preds)), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    numerator = correct * total - true_counts @ predicted_counts
    denominator = np.sqrt(
        (total**2 - predicted_counts @ predicted_counts) * (total**2 - true_counts @ true_counts)
    )
    return float(numerator / denominator) if denominator else 0.0


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
}


def task_metric(metric_name: str, preds: ArrayLike, labels: ArrayLike) -> float:
    """The metric called `metric_name` ('accuracy', 'f1' or 'matthews')."""
    metric = METRICS.get(metric_name)
    if metric is None:
        raise MetricError(
            f"unknown metric {metric_name!r}; expected one of {', '.join(METRICS)}. Pick one of those."
        )
    return metric(preds, labels)


def all_metrics(metric_name: str, preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Accuracy plus the primary metric under its own name."""
    return {"accuracy": accuracy(preds, labels), metric_name: task_metric(metric_name, preds, labels)}
