"""Exact offline simulation of exit policies over recorded exits.

`simulate` replays an N x M x K recording through the runtime's own early-exit loop
(`pcee.runtime.replay`), so the policy steps, the spans, the compaction and
the last-layer rule are the served ones; simulated and served exit layers agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcee.modeling.metrics import task_metric
from pcee.runtime import (
    AllExits,
    ExitPolicy,
    OperatingPoint,
    PolicyError,
    build_policy,
    layer_speedup,
    replay,
)

from .errors import CalibrationError


@dataclass(frozen=True)
class CalibrationRows:
    """Every exit of N labelled rows (`labels` index into the bundle's labels)."""

    exits: AllExits
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.labels) == 0:
            raise CalibrationError(
                "the calibration data has no rows; give a labelled data set with at least one row per part"
            )
        if self.exits.logits.shape[0] != len(self.labels):
            raise CalibrationError(
                f"recorded exits cover {self.exits.logits.shape[0]} rows but {len(self.labels)} labels were given"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_layers(self) -> int:
        return self.exits.logits.shape[1]

    def subset(self, rows: np.ndarray) -> CalibrationRows:
        return CalibrationRows(self.exits.select(rows), self.labels[rows])


@dataclass(frozen=True)
class SimulatedExits:
    exit_layers: np.ndarray  # int [N], 1-based
    probabilities: np.ndarray  # [N, K], what each row predicts when it leaves
    num_layers: int

    @property
    def layer_speedup(self) -> float:
        return layer_speedup(int(self.exit_layers.sum()), len(self.exit_layers), self.num_layers)


def simulate(policy: ExitPolicy, exits: AllExits) -> SimulatedExits:
    """Each row's exit layer and prediction under `policy`, through the runtime's own loop."""
    try:
        outcome = replay(policy, exits)
    except PolicyError as error:
        raise CalibrationError(str(error)) from None
    return SimulatedExits(outcome.exit_layer, outcome.probabilities, exits.num_layers)


def exit_histogram(exit_layers: np.ndarray, num_layers: int) -> list[int]:
    """How many rows left at each layer, layer 1 first."""
    return np.bincount(exit_layers, minlength=num_layers + 1)[1:].tolist()


@dataclass(frozen=True)
class Outcome:
    """One operating point simulated on a set of rows."""

    point: OperatingPoint
    exit_layers: np.ndarray
    predictions: np.ndarray
    layer_speedup: float
    metric: float


class Simulator:
    """Simulates operating points on fixed rows and scores them with the task's metric."""

    def __init__(self, rows: CalibrationRows, metric_name: str, has_learned_score: bool = False):
        self.rows = rows
        self.metric_name = metric_name
        self.has_learned_score = has_learned_score

    @property
    def num_layers(self) -> int:
        return self.rows.num_layers

    def run(self, point: OperatingPoint) -> Outcome:
        policy = build_policy(point, self.num_layers, self.has_learned_score)
        simulated = simulate(policy, self.rows.exits)
        predictions = simulated.probabilities.argmax(axis=-1)
        return Outcome(
            point=policy.point,
            exit_layers=simulated.exit_layers,
            predictions=predictions,
            layer_speedup=simulated.layer_speedup,
            metric=task_metric(self.metric_name, predictions, self.rows.labels),
        )
