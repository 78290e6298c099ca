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
from .noise import SIGNIFICANCE, SignTest, metric_interval
from .search import (
    TARGET_BAND,
    SweepState,
    TargetChoice,
    all_states,
    choose_for_target,
    grid_outcomes,
    pareto_frontier,
    sweeps_for,
)
from .simulate import CalibrationRows, Outcome, Simulator, exit_histogram

PATIENCE_GRID_SIZE = 40  # tau values per patience on the patience plot
PATH_GRID_SIZE = 200  # points per sweep on the quality-bound path
SPEEDUP_MISS = 0.05  # a held-out speed-up further than this from the target is warned about
POINT_SOURCE = "pcee-calibrate"


@dataclass(frozen=True)
class Objective:
    """What to calibrate for: exactly one of a target layer speed-up and a maximal accuracy drop.

    A target S is met within [S, S + TARGET_BAND]; `at_least` (up to 1) or `max_speedup` lets the
    search go faster where the gain beats the metric's noise (see `search.choose_for_target`).
    """

    target_speedup: float | None = None
    max_drop: float | None = None
    confidence: float = 0.95
    at_least: bool = False
    max_speedup: float | None = None

    def __post_init__(self) -> None:
        if (self.target_speedup is None) == (self.max_drop is None):
            raise OptionError("give exactly one objective: --target-speedup S or --max-drop D")
        for name in ("target_speedup", "max_drop", "confidence", "max_speedup"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0
            ):
                raise OptionError(not_a_fraction(f"--{name.replace('_', '-')}", value))
        if not isinstance(self.at_least, bool):
            raise OptionError(f"--at-least is a flag: True or False, got {self.at_least!r}")
        if (self.at_least or self.max_speedup is not None) and self.target_speedup is None:
            raise OptionError(
                "--at-least and --max-speedup go with --target-speedup; drop them with --max-drop"
            )
        if self.max_speedup is not None and self.max_speedup <= self.target_speedup:
            raise OptionError(
                f"--max-speedup {self.max_speedup:g} must exceed --target-speedup {self.target_speedup:g}"
            )

    @property
    def speedup_cap(self) -> float | None:
        """How far above the target the search may go when the gain beats the noise; None: the band only."""
        return self.max_speedup if self.max_speedup is not None else (1.0 if self.at_least else None)

    @property
    def mode(self) -> str:
        return "target-speedup" if self.target_speedup is not None else "max-drop"

    def default_name(self) -> str:
        if self.target_speedup is not None:
            return f"speedup-{format_knob(self.target_speedup)}"
        return f"max-drop-{format_knob(self.max_drop)}"

    def to_dict(self) -> dict:
        if self.target_speedup is not None:
            return {
                "mode": self.mode,
                "target_speedup": self.target_speedup,
                "band": [self.target_speedup, round(self.target_speedup + TARGET_BAND, 6)],
                "at_least": self.at_least,
                "max_speedup": self.max_speedup,
            }
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
    target: TargetChoice | None  # how the target was met (target-speedup mode)
    intervals: dict[str, tuple[float, float]]  # 95% bootstrap intervals: calibration, holdout, full_model
    full_versus_holdout: SignTest  # the full model against the chosen point on the held-out rows

    @property
    def point(self) -> OperatingPoint:
        return self.chosen.point

    def summarize(self, outcome: Outcome, part: str) -> dict:
        return {
            "rows": len(outcome.exit_layers),
            "layer_speedup": round(outcome.layer_speedup, 6),
            "metric": round(outcome.metric, 6),
            "metric_interval": rounded(self.intervals[part]),
            "exit_histogram": exit_histogram(outcome.exit_layers, self.num_layers),
        }

    @property
    def warnings(self) -> list[str]:
        """One line each: a held-out metric below the full model's by more than noise, a missed target."""
        lines = []
        test = self.full_versus_holdout
        if self.holdout.metric < self.full_holdout.metric and test.p_value <= SIGNIFICANCE:
            lines.append(
                f"held-out {self.metric_name} {self.holdout.metric:.4f} is below the full model's "
                f"{self.full_holdout.metric:.4f} by more than noise (of the held-out rows where they disagree, the full "
                f"model is right on {test.wins} and the point on {test.losses}; sign test p = {test.p_value:.3g}). "
                "Ask for a lower speed-up, or calibrate on more data"
            )
        target = self.objective.target_speedup
        if target is not None and abs(self.holdout.layer_speedup - target) > SPEEDUP_MISS:
            lines.append(
                f"held-out layer speed-up {self.holdout.layer_speedup:.4f} misses the requested {target:g} by more "
                f"than {SPEEDUP_MISS:g}: speed-ups measured on {len(self.holdout.exit_layers)} held-out and "
                f"{len(self.chosen.exit_layers)} search rows are noisy, or those rows differ. Calibrate on more data"
            )
        return lines

    def target_summary(self) -> dict | None:
        if self.target is None:
            return None
        further = self.target.further
        return {
            "requested": self.objective.target_speedup,
            "calibration_speedup": round(self.chosen.layer_speedup, 6),
            "holdout_speedup": round(self.holdout.layer_speedup, 6),
            "band_point": self.target.band_choice.point.to_dict(),
            "went_further": further is not None and further.accepted,
            "further_candidate": None if further is None else further.to_dict(),
        }

    def to_dict(self) -> dict:
        return {
            "operating_point": self.point.to_dict(),
            "metric_name": self.metric_name,
            "objective": self.objective.to_dict(),
            "target": self.target_summary(),
            "calibration": self.summarize(self.chosen, "calibration"),
            "holdout": self.summarize(self.holdout, "holdout"),
            "full_model": {
                "metric": round(self.full_holdout.metric, 6),
                "metric_interval": rounded(self.intervals["full_model"]),
                "calibration_metric": round(self.full_search.metric, 6),
            },
            "holdout_versus_full": self.full_versus_holdout.to_dict(),
            "warnings": self.warnings,
            "guarantee": None if self.certification is None else self.certification.to_dict(),
            "seed": self.seed,
        }


def rounded(interval: tuple[float, float]) -> list[float]:
    return [round(bound, 6) for bound in interval]


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
    certification = target = None
    if objective.target_speedup is not None:
        target = choose_for_target(
            search, states[policy], objective.target_speedup, max_speedup=objective.speedup_cap
        )
        chosen = target.outcome
    else:
        certification = certify(search, objective, policy, seed)
        chosen = search.run(certification.chosen.outcome.point)
    chosen = replace(
        chosen, point=replace(chosen.point, name=name or objective.default_name(), source=POINT_SOURCE)
    )
    chosen_holdout, full_holdout = holdout.run(chosen.point), holdout.run(FULL_MODEL)
    holdout_labels = holdout.rows.labels
    return CalibrationResult(
        objective=objective,
        metric_name=metric_name,
        num_layers=rows.num_layers,
        chosen=chosen,
        holdout=chosen_holdout,
        full_search=search.run(FULL_MODEL),
        full_holdout=full_holdout,
        frontiers={each: pareto_frontier(states[each]) for each in frontier_policies(has_learned_score)},
        patience_grid=grid_outcomes(
            search, sweeps_for(DEFAULT_POLICY, search.rows.exits), PATIENCE_GRID_SIZE
        ),
        certification=certification,
        seed=seed,
        target=target,
        intervals={
            "calibration": metric_interval(metric_name, chosen.predictions, search.rows.labels, seed),
            "holdout": metric_interval(metric_name, chosen_holdout.predictions, holdout_labels, seed),
            "full_model": metric_interval(metric_name, full_holdout.predictions, holdout_labels, seed),
        },
        full_versus_holdout=SignTest.of(full_holdout.predictions, chosen_holdout.predictions, holdout_labels),
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


def not_a_fraction(flag: str, value) -> str:
    """The error for a value outside (0, 1); a percentage (50) gets the fraction to pass (0.5)."""
    message = f"{flag} must lie strictly between 0 and 1, got {value!r}"
    if isinstance(value, Real) and not isinstance(value, bool) and 1 < value < 100:
        message += f": a fraction, not a percentage; pass {value / 100:g}"
    return message
