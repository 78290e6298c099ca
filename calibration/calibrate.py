"""Choose an operating point from recorded exits: a target layer speed-up, or a certified quality bound.

The rows are split once: the search part chooses the point, the held-out part reports it (those
are the numbers a user will see in production). In quality-bound mode the search part is split
again into an ordering half, which fixes the sequence of points to test, and a testing half,
which certifies them (see `bound`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Real

import numpy as np

from pcee.runtime import DEFAULT_POLICY, POLICIES, OperatingPoint

from .bound import FULL_MODEL, Certification, certify_max_drop
from .errors import CalibrationError, OptionError
from .search import (
    SweepState,
    all_states,
    grid_outcomes,
    pareto_frontier,
    run_best_reaching,
    sweeps_for,
)
from .simulate import CalibrationRows, Outcome, Simulator, exit_histogram

PATIENCE_GRID_SIZE = 40  # tau values per patience on the patience plot
PATH_GRID_SIZE = 200  # points per sweep on the quality-bound path
POINT_SOURCE = "pcee-calibrate"


@dataclass(frozen=True)
class Objective:
    """What to calibrate for: exactly one of a target layer speed-up and a maximal accuracy drop."""

    target_speedup: float | None = None
    max_drop: float | None = None
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if (self.target_speedup is None) == (self.max_drop is None):
            raise OptionError("give exactly one objective: --target-speedup S or --max-drop D")
        for name in ("target_speedup", "max_drop", "confidence"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0
            ):
                raise OptionError(
                    f"--{name.replace('_', '-')} must lie strictly between 0 and 1, got {value!r}"
                )

    @property
    def mode(self) -> str:
        return "target-speedup" if self.target_speedup is not None else "max-drop"

    def default_name(self) -> str:
        if self.target_speedup is not None:
            return f"speedup-{format_knob(self.target_speedup)}"
        return f"max-drop-{format_knob(self.max_drop)}"

    def to_dict(self) -> dict:
        if self.target_speedup is not None:
            return {"mode": self.mode, "target_speedup": self.target_speedup}
        return {"mode": self.mode, "max_drop": self.max_drop, "confidence": self.confidence}


def format_knob(value: float) -> str:
    return f"{value:.2f}" if round(value, 2) == value else f"{value:g}"


@dataclass(frozen=True)
class CalibrationResult:
    objective: Objective
    metric_name: str
    num_layers: int
    chosen: Outcome  # on the search rows
    holdout: Outcome
    full_search: Outcome
    full_holdout: Outcome
    frontiers: dict[str, list[SweepState]]  # per policy, exact, on the search rows
    patience_grid: list[Outcome]  # the default policy over a tau grid at every patience, on the search rows
    certification: Certification | None
    seed: int

    @property
    def point(self) -> OperatingPoint:
        return self.chosen.point

    def summarize(self, outcome: Outcome) -> dict:
        return {
            "rows": len(outcome.exit_layers),
            "layer_speedup": round(outcome.layer_speedup, 6),
            "metric": round(outcome.metric, 6),
            "exit_histogram": exit_histogram(outcome.exit_layers, self.num_layers),
        }

    def to_dict(self) -> dict:
        return {
            "operating_point": self.point.to_dict(),
            "metric_name": self.metric_name,
            "objective": self.objective.to_dict(),
            "calibration": self.summarize(self.chosen),
            "holdout": self.summarize(self.holdout),
            "full_model": {
                "metric": round(self.full_holdout.metric, 6),
                "calibration_metric": round(self.full_search.metric, 6),
            },
            "guarantee": None if self.certification is None else self.certification.to_dict(),
            "seed": self.seed,
        }


def split_rows(
    count: int, fraction: float, seed: int, part_names: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """A random split of range(count): (the rest, `fraction` of the rows); both parts non-empty."""
    order = np.random.default_rng(seed).permutation(count)
    taken = int(round(count * fraction))
    if not 0 < taken < count:
        raise CalibrationError(
            f"{count} labelled rows cannot be split into {part_names[0]} and {part_names[1]} rows "
            f"with fraction {fraction:g}; give more labelled data"
        )
    return np.sort(order[taken:]), np.sort(order[:taken])


def holdout_split(count: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(search rows, held-out rows): the one split of pcee-calibrate, which pcee-eval --holdout-of repeats."""
    return split_rows(count, holdout_fraction, seed, ("search", "held-out"))


def frontier_policies(has_learned_score: bool) -> list[str]:
    return [
        name
        for name, spec in POLICIES.items()
        if spec.calibrated and (has_learned_score or not spec.needs_learned_score)
    ]


def calibrate(
    rows: CalibrationRows,
    metric_name: str,
    objective: Objective,
    policy: str = DEFAULT_POLICY,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    has_learned_score: bool = False,
    name: str | None = None,
) -> CalibrationResult:
    """Search the operating point on one part of `rows` and report it on the held-out part.

    The point is named `name`, by default after the objective ('speedup-0.50', 'max-drop-0.01').
    """
    search_indices, holdout_indices = holdout_split(len(rows), holdout_fraction, seed)
    search = Simulator(rows.subset(search_indices), metric_name, has_learned_score)
    holdout = Simulator(rows.subset(holdout_indices), metric_name, has_learned_score)
    # The calibrated policy first, so that a policy this bundle cannot run fails before any other work.
    states = {
        each: all_states(search, sweeps_for(each, search.rows.exits))
        for each in dict.fromkeys([policy, *frontier_policies(has_learned_score)])
    }
    certification = None
    if objective.target_speedup is not None:
        chosen = run_best_reaching(search, states[policy], objective.target_speedup)
    else:
        certification = certify(search, objective, policy, seed)
        chosen = search.run(certification.chosen.outcome.point)
    chosen = replace(
        chosen, point=replace(chosen.point, name=name or objective.default_name(), source=POINT_SOURCE)
    )
    return CalibrationResult(
        objective=objective,
        metric_name=metric_name,
        num_layers=rows.num_layers,
        chosen=chosen,
        holdout=holdout.run(chosen.point),
        full_search=search.run(FULL_MODEL),
        full_holdout=holdout.run(FULL_MODEL),
        frontiers={each: pareto_frontier(states[each]) for each in frontier_policies(has_learned_score)},
        patience_grid=grid_outcomes(
            search, sweeps_for(DEFAULT_POLICY, search.rows.exits), PATIENCE_GRID_SIZE
        ),
        certification=certification,
        seed=seed,
    )


def certify(search: Simulator, objective: Objective, policy: str, seed: int) -> Certification:
    """Split the search rows in halves: one orders the candidate points, the other tests them."""
    ordering_indices, testing_indices = split_rows(len(search.rows), 0.5, seed + 1, ("ordering", "testing"))
    ordering = Simulator(search.rows.subset(ordering_indices), search.metric_name, search.has_learned_score)
    testing = Simulator(search.rows.subset(testing_indices), search.metric_name, search.has_learned_score)
    sweeps = sweeps_for(policy, ordering.rows.exits)
    return certify_max_drop(
        ordering, testing, sweeps, objective.max_drop, objective.confidence, PATH_GRID_SIZE
    )
