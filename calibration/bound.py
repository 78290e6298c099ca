"""Quality bound: the largest speed-up whose accuracy drop against the full model is at most D,
with probability at least `confidence` (Learn-then-Test, fixed-sequence testing).

The per-row loss is loss_i = 1[full model right and the point wrong]. Its mean R bounds the
accuracy drop: acc(full) - acc(point) = P(full right, point wrong) - P(full wrong, point right)
<= R. For each point on a path, H0: R > D is tested with the exact binomial p-value
P(Binomial(n, D) <= k), k the losses among n testing rows. Points are tested in order from the
most conservative to the most aggressive and testing stops at the first p-value above
epsilon = 1 - confidence; fixed-sequence testing controls the family-wise error at epsilon with
no multiplicity correction, because a hypothesis is only tested once all earlier ones were
rejected.

Guarantee: with probability at least `confidence` over the draw of the testing rows, every
certified point, so the returned one too, has R <= D, hence an expected accuracy drop of at
most D on data drawn like the testing rows. It assumes the testing rows are exchangeable with
production traffic (i.i.d. from one distribution), and that the path was fixed before the
testing rows were looked at: it is built on a disjoint "ordering" split. The bound is on the
accuracy drop for every task; for F1 / Matthews tasks the task metric is reported, not bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pcee.runtime import FULL_POLICY, OperatingPoint

from .errors import CalibrationError
from .noise import binomial_cdf
from .search import Sweep, grid_outcomes, pareto_frontier
from .simulate import Outcome, Simulator

FULL_MODEL = OperatingPoint(FULL_POLICY)


def drop_losses(
    point_predictions: np.ndarray, full_predictions: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """1 where the full model is right and the point is wrong: its mean bounds the accuracy drop."""
    return (full_predictions == labels) & (point_predictions != labels)


def rows_needed(max_drop: float, epsilon: float) -> int:
    """Testing rows needed to certify even a point with no loss at all: (1 - D)^n <= epsilon."""
    return math.ceil(math.log(epsilon) / math.log1p(-max_drop))


@dataclass(frozen=True)
class CertifiedPoint:
    outcome: Outcome  # on the testing rows
    losses: int
    p_value: float


@dataclass(frozen=True)
class Certification:
    """The most aggressive certified point and the facts of its test."""

    chosen: CertifiedPoint
    max_drop: float
    confidence: float
    ordering_rows: int
    testing_rows: int
    path_length: int
    certified: int

    def to_dict(self) -> dict:
        return {
            "quantity": "accuracy drop against the full model, bounded by P(full right and point wrong)",
            "max_drop": self.max_drop,
            "confidence": self.confidence,
            "test": "exact binomial, fixed-sequence testing along the frontier (Learn-then-Test)",
            "assumption": "calibration data exchangeable with production traffic",
            "ordering_rows": self.ordering_rows,
            "testing_rows": self.testing_rows,
            "path_length": self.path_length,
            "certified_points": self.certified,
            "losses": self.chosen.losses,
            "loss_rate": self.chosen.losses / self.testing_rows,
            "p_value": self.chosen.p_value,
        }


def loss_rate_quality(simulator: Simulator) -> Callable[[Outcome], float]:
    full = simulator.run(FULL_MODEL)
    return lambda outcome: (
        -float(drop_losses(outcome.predictions, full.predictions, simulator.rows.labels).mean())
    )


def run_fixed_sequence(
    path: list[OperatingPoint], testing: Simulator, max_drop: float, epsilon: float
) -> list[CertifiedPoint]:
    """Test each point in order; return the certified ones (everything before the first failure)."""
    full = testing.run(FULL_MODEL)
    labels = testing.rows.labels
    certified = []
    for point in path:
        outcome = testing.run(point)
        losses = int(drop_losses(outcome.predictions, full.predictions, labels).sum())
        p_value = binomial_cdf(losses, len(labels), max_drop)
        if p_value > epsilon:
            break
        certified.append(CertifiedPoint(outcome, losses, p_value))
    return certified


def certify_max_drop(
    ordering: Simulator,
    testing: Simulator,
    sweeps: list[Sweep],
    max_drop: float,
    confidence: float,
    grid_size: int,
) -> Certification:
    """The path is the (speed-up, loss) Pareto frontier of a grid on the ordering rows; the test runs on the testing rows."""
    epsilon = 1.0 - confidence
    path = [
        outcome.point
        for outcome in pareto_frontier(
            grid_outcomes(ordering, sweeps, grid_size), loss_rate_quality(ordering)
        )
    ]
    certified = run_fixed_sequence(path, testing, max_drop, epsilon)
    if not certified:
        raise CalibrationError(
            f"no operating point of policy {sweeps[0].policy} can be certified to lose at most {max_drop:g} accuracy "
            f"with confidence {confidence:g} on {len(testing.rows)} testing rows (even a point with no loss needs "
            f"{rows_needed(max_drop, epsilon)} testing rows). Give more labelled data, a larger --max-drop, or a lower --confidence"
        )
    return Certification(
        certified[-1], max_drop, confidence, len(ordering.rows), len(testing.rows), len(path), len(certified)
    )
