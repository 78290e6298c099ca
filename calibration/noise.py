"""How much a metric measured on a few rows can be trusted: exact binomial tails, a paired sign test on the
rows where two predictions disagree, and a bootstrap interval for any task metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pcee.modeling.metrics import task_metric

SIGNIFICANCE = 0.05  # one-sided level of the paired tests
INTERVAL_LEVEL = 0.95
BOOTSTRAP_DRAWS = 2000
SMALL_DATA_ROWS = 500  # below this many rows the terminal table shows the metric's interval


def binomial_cdf(successes: int, trials: int, probability: float) -> float:
    """P(X <= successes) for X ~ Binomial(trials, probability), summed in log space."""
    if probability <= 0.0 or successes >= trials:
        return 1.0
    if successes < 0 or probability >= 1.0:
        return 0.0
    counts = np.arange(successes + 1)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(trials - counts[:-1]) - np.log(counts[1:]))])
    log_terms = log_choose + counts * math.log(probability) + (trials - counts) * math.log1p(-probability)
    largest = log_terms.max()
    return min(1.0, float(math.exp(largest) * np.exp(log_terms - largest).sum()))


@dataclass(frozen=True)
class SignTest:
    """Exact one-sided sign test (McNemar's exact test) on the rows where exactly one of two predictions is right.

    H0: on such a row, either side is right with probability 1/2. p_value = P(Binomial(wins + losses, 1/2) >= wins).
    """

    wins: int  # rows the first prediction gets right and the second wrong
    losses: int  # the other way round

    @classmethod
    def of(cls, first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> SignTest:
        first_right, second_right = first == labels, second == labels
        return cls(int((first_right & ~second_right).sum()), int((second_right & ~first_right).sum()))

    @property
    def p_value(self) -> float:
        return 1.0 - binomial_cdf(self.wins - 1, self.wins + self.losses, 0.5)

    def to_dict(self) -> dict:
        return {"wins": self.wins, "losses": self.losses, "p_value": round(self.p_value, 6)}


def metric_interval(
    metric_name: str, predictions: np.ndarray, labels: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the task metric over the rows (resampled with replacement)."""
    drawn = np.random.default_rng(seed).integers(0, len(labels), size=(BOOTSTRAP_DRAWS, len(labels)))
    if metric_name == "accuracy":  # the same bootstrap, vectorised
        values = (predictions == labels)[drawn].mean(axis=1)
    else:
        values = np.array([task_metric(metric_name, predictions[rows], labels[rows]) for rows in drawn])
    tail = 100 * (1 - INTERVAL_LEVEL) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
