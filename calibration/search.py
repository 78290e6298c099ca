"""Operating-point search over simulated exits: sweeps, their exact states, target speed-up, Pareto frontiers.

A sweep turns one knob of a policy from its most conservative to its most aggressive setting,
so layer speed-up never decreases along it: tau at a fixed patience (a larger entropy threshold,
or a smaller max-probability / learned-score threshold, makes more rows confident, so every
patience counter is at least as large at every layer), an integer knob (PABEE's patience, the
budgeted layer) from its largest value down. Which knob, which values and which signal come from
the policy's entry in the runtime's registry (`pcee.runtime.POLICIES`).

A tau sweep has one threshold per split of the recorded values, but most thresholds change no
row's exit. For PCEE-like policies (`exits_on_confident_streak`), `sweep_states` lists the distinct states of a sweep exactly (where each begins along
the sweep, with its layer speed-up and metric) from the recorded confidences, updating only the
rows whose exit changes, instead of one simulation per threshold; other policies are replayed at every threshold. Tests check every state against
a replay through the runtime's loop, and the chosen point is always replayed (`Simulator.run`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pcee.modeling.metrics import task_metric
from pcee.runtime import (
    CONFIDENCE_SIGNALS,
    POLICIES,
    AllExits,
    OperatingPoint,
    PceeError,
    PolicySpec,
    layer_speedup,
    policy_names,
    policy_spec,
)

from .errors import CalibrationError
from .noise import SIGNIFICANCE, SignTest
from .simulate import Outcome, Simulator

# Endpoint thresholds sit this far beyond the observed values: all rows confident, or none.
ENDPOINT_MARGIN = 1e-6
SPEEDUP_TOLERANCE = 1e-12
TARGET_BAND = 0.02  # a target speed-up S is met by the search rows' speed-ups in [S, S + TARGET_BAND]


@dataclass(frozen=True)
class Sweep:
    """One knob of a policy, most conservative setting first: layer speed-up never decreases along it."""

    policy: str
    knob: str  # "tau", "patience" or "layer"
    values: np.ndarray
    patience: int | None = None  # the fixed patience of a tau sweep

    def __len__(self) -> int:
        return len(self.values)

    def point(self, index: int) -> OperatingPoint:
        value = self.values[index].item()
        if self.knob == "tau":
            return OperatingPoint(self.policy, tau=value, patience=self.patience)
        return OperatingPoint(self.policy, **{self.knob: value})


@dataclass(frozen=True)
class SweepState:
    """A distinct state of a sweep: from sweep index `index` up to the next state's, every row exits alike."""

    sweep: Sweep
    index: int
    layer_speedup: float
    metric: float

    @property
    def point(self) -> OperatingPoint:
        return self.sweep.point(self.index)

    @property
    def patience(self) -> int:
        """The point's patience (0 for budgeted exit), without building the point."""
        return (
            int(self.sweep.values[self.index]) if self.sweep.knob == "patience" else self.sweep.patience or 0
        )


def candidate_thresholds(signal: str, values: np.ndarray) -> np.ndarray:
    """Thresholds that split the observed signal values every possible way, most conservative first.

    Midpoints between consecutive distinct values (so a recorded value never sits on the
    threshold, whatever float noise the deployed backend adds), plus one beyond each end.
    """
    distinct = np.unique(np.asarray(values, dtype=np.float64))
    thresholds = np.concatenate(
        [
            [distinct[0] - ENDPOINT_MARGIN],
            (distinct[:-1] + distinct[1:]) / 2,
            [distinct[-1] + ENDPOINT_MARGIN],
        ]
    )
    if CONFIDENCE_SIGNALS[signal].unit_interval:
        thresholds = np.unique(np.clip(thresholds, 0.0, 1.0))
    # Confident below tau: a larger tau is more aggressive; confident above: a smaller one.
    return thresholds if CONFIDENCE_SIGNALS[signal].confident_below else thresholds[::-1]


def calibrated_spec(policy: str) -> PolicySpec:
    try:
        spec = policy_spec(policy)
    except PceeError:
        spec = None
    if spec is None or not spec.calibrated or spec.swept is None:
        raise CalibrationError(
            f"policy {policy!r} cannot be calibrated; choose one of {', '.join(policy_names(calibrated_only=True))}"
        )
    return spec


def sweeps_for(policy: str, exits: AllExits) -> list[Sweep]:
    """Every sweep of `policy` over the thresholds these exits make distinguishable (see PolicySpec)."""
    spec = calibrated_spec(policy)
    num_layers = exits.logits.shape[1]
    if spec.signal is not None:
        values = getattr(exits, spec.signal)
        if values is None:
            raise CalibrationError(
                f"policy {policy} needs a learned confidence score; this bundle has none. "
                f"Choose {' or '.join(policies_without_learned_score())}"
            )
        taus = candidate_thresholds(spec.signal, values)
        patiences = spec.knob("patience").values(num_layers)[::-1] if spec.knob("patience") else [None]
        return [Sweep(policy, "tau", taus, patience) for patience in patiences]
    knob = spec.knobs[0]
    values = np.array(knob.values(num_layers))
    if not len(values):
        raise CalibrationError(
            f"policy {policy} has no {knob.name} to sweep on a model with {num_layers} layer(s): its {knob.name} "
            f"lies in {knob.smallest(num_layers)}..{knob.largest(num_layers)}"
        )
    return [Sweep(policy, knob.name, values)]


def policies_without_learned_score() -> list[str]:
    """The threshold policies with patience that run on any bundle: what to choose instead of a learned one."""
    return [
        name
        for name, spec in POLICIES.items()
        if spec.calibrated
        and spec.signal is not None
        and not spec.needs_learned_score
        and spec.allows_patience
    ]


# ------------------------------------------------------------------------------ exact sweep states


def sweep_states(simulator: Simulator, sweep: Sweep) -> list[SweepState]:
    """Every distinct state of the sweep, most conservative first."""
    if sweep.knob != "tau" or not policy_spec(sweep.policy).policy_class.exits_on_confident_streak:
        outcomes = (simulator.run(sweep.point(index)) for index in range(len(sweep)))
        return [
            SweepState(sweep, index, outcome.layer_speedup, outcome.metric)
            for index, outcome in enumerate(outcomes)
        ]
    return tau_sweep_states(simulator, sweep)


def tau_sweep_states(simulator: Simulator, sweep: Sweep) -> list[SweepState]:
    """Walk the sweep's indices where some row's exit changes, updating only those rows."""
    exits, labels, num_layers = simulator.rows.exits, simulator.rows.labels, simulator.num_layers
    earliest = earliest_streaks(sweep, exits)
    event_rows, event_streaks = np.nonzero(earliest < len(sweep))
    event_indices = earliest[event_rows, event_streaks]
    order = np.argsort(event_indices, kind="stable")
    event_rows, event_indices = event_rows[order], event_indices[order]
    starts = np.union1d([0], event_indices)
    firsts, ends = (
        np.searchsorted(event_indices, starts, side="left"),
        np.searchsorted(event_indices, starts, side="right"),
    )
    argmax = exits.logits.argmax(axis=-1)
    exit_layers = np.full(
        len(labels), num_layers
    )  # before any confident streak every row runs to the last layer
    predictions = argmax[:, -1].copy()
    states = []
    for index, first, end in zip(starts, firsts, ends, strict=True):
        rows = event_rows[first:end]
        # A row exits where its first confident streak ends; with none, at the last layer.
        exit_layers[rows] = np.minimum(num_layers, sweep.patience + (earliest[rows] > index).sum(axis=1))
        predictions[rows] = argmax[rows, exit_layers[rows] - 1]
        speedup = layer_speedup(int(exit_layers.sum()), len(labels), num_layers)
        states.append(
            SweepState(sweep, int(index), speedup, task_metric(simulator.metric_name, predictions, labels))
        )
    return states


def earliest_streaks(sweep: Sweep, exits: AllExits) -> np.ndarray:
    """[rows, layers - patience + 1]: the first sweep index at which a confident streak ends at layer
    patience + j or earlier (len(sweep) where none does); non-increasing along j."""
    onsets = confidence_onsets(sweep, getattr(exits, policy_spec(sweep.policy).signal))
    streaks = sliding_window_view(onsets, sweep.patience, axis=1).max(axis=-1)
    return np.minimum.accumulate(streaks, axis=1)


def confidence_onsets(sweep: Sweep, values: np.ndarray) -> np.ndarray:
    """Per row and layer, the first sweep index whose tau makes that exit confident (len(sweep): none).

    The taus are compared in the recorded values' dtype, as the policy compares a Python float with them.
    """
    taus = sweep.values.astype(values.dtype)
    if CONFIDENCE_SIGNALS[policy_spec(sweep.policy).signal].confident_below:  # the taus ascend
        return np.searchsorted(taus, values, side="right")
    return len(taus) - np.searchsorted(
        taus[::-1], values, side="left"
    )  # confident above tau; the taus descend


def all_states(simulator: Simulator, sweeps: list[Sweep]) -> list[SweepState]:
    return [state for sweep in sweeps for state in sweep_states(simulator, sweep)]


# ------------------------------------------------------------------------------ target


@dataclass(frozen=True)
class FurtherCandidate:
    """The faster point looked at beyond the band, and whether its gain beat the noise."""

    outcome: Outcome
    test: SignTest  # the candidate against the band's choice, on the search rows
    candidates: int  # frontier points beyond the band scoring higher than the band's choice
    accepted: bool

    def to_dict(self) -> dict:
        return {
            "operating_point": self.outcome.point.to_dict(),
            "layer_speedup": round(self.outcome.layer_speedup, 6),
            "metric": round(self.outcome.metric, 6),
            "sign_test": self.test.to_dict(),
            "bonferroni_candidates": self.candidates,
            "p_value_needed": round(SIGNIFICANCE / self.candidates, 6),
            "accepted": self.accepted,
        }


@dataclass(frozen=True)
class TargetChoice:
    outcome: Outcome  # the chosen point, replayed on the search rows
    band_choice: Outcome  # the band's best point (the chosen one unless a faster one beat the noise)
    further: FurtherCandidate | None = None


def reaching(states: list[SweepState], target: float) -> list[SweepState]:
    return [state for state in states if state.layer_speedup >= target - SPEEDUP_TOLERANCE]


def within_band(states: list[SweepState], target: float, band: float) -> list[SweepState]:
    """The states reaching `target` by at most `band`; if none (an integer knob jumps over the band), those at
    the smallest speed-up reaching it."""
    candidates = reaching(states, target)
    inside = [state for state in candidates if state.layer_speedup <= target + band + SPEEDUP_TOLERANCE]
    if inside or not candidates:
        return inside
    nearest = min(state.layer_speedup for state in candidates)
    return [state for state in candidates if state.layer_speedup <= nearest + SPEEDUP_TOLERANCE]


def best_of(states: list[SweepState]) -> SweepState:
    """The best metric; ties go to the higher speed-up, then the lower patience, then the more conservative threshold."""
    return max(states, key=lambda state: (state.metric, state.layer_speedup, -state.patience, -state.index))


def choose_for_target(
    simulator: Simulator,
    states: list[SweepState],
    target: float,
    band: float = TARGET_BAND,
    max_speedup: float | None = None,
) -> TargetChoice:
    """The band's best point (see `within_band`); with `max_speedup`, the best frontier point between the band
    and `max_speedup` instead, if it is right on significantly more of the rows where the two disagree
    (exact one-sided sign test, Bonferroni over the frontier points beyond the band that score higher)."""
    inside = within_band(states, target, band)
    if not inside:
        speedups = [state.layer_speedup for state in states]
        raise CalibrationError(
            f"target layer speed-up {target:g} is out of reach for policy {states[0].sweep.policy} on these "
            f"{len(simulator.rows)} rows: reachable layer speed-ups are {min(speedups):.4f} to {max(speedups):.4f}. "
            "Ask for a target in that range, or choose another policy"
        )
    chosen = simulator.run(best_of(inside).point)
    top = max(state.layer_speedup for state in inside) + SPEEDUP_TOLERANCE
    if max_speedup is None:
        return TargetChoice(chosen, chosen)
    allowed = [state for state in states if top < state.layer_speedup <= max_speedup + SPEEDUP_TOLERANCE]
    beyond = [state for state in pareto_frontier(allowed) if state.metric > chosen.metric]
    if not beyond:
        return TargetChoice(chosen, chosen)
    candidate = simulator.run(best_of(beyond).point)
    test = SignTest.of(candidate.predictions, chosen.predictions, simulator.rows.labels)
    accepted = test.p_value <= SIGNIFICANCE / len(beyond)
    return TargetChoice(
        candidate if accepted else chosen, chosen, FurtherCandidate(candidate, test, len(beyond), accepted)
    )


def search_target(simulator: Simulator, sweeps: list[Sweep], target: float) -> Outcome:
    """The calibration's point for `target` over every point of every sweep (`choose_for_target`), replayed."""
    return choose_for_target(simulator, all_states(simulator, sweeps), target).outcome


def best_reaching(states: list[SweepState], target: float) -> SweepState | None:
    """The best metric among the states reaching `target` (`best_of`): what each policy offers at a speed-up."""
    candidates = reaching(states, target)
    return best_of(candidates) if candidates else None


# ------------------------------------------------------------------------------ grids and frontiers


def sweep_grid(simulator: Simulator, sweep: Sweep, size: int) -> list[Outcome]:
    """At most `size` points spread evenly along the sweep's candidate list, both ends included."""
    indices = np.unique(np.linspace(0, len(sweep) - 1, size).round().astype(int))
    return [simulator.run(sweep.point(index)) for index in indices]


def grid_outcomes(simulator: Simulator, sweeps: list[Sweep], size: int) -> list[Outcome]:
    return [outcome for sweep in sweeps for outcome in sweep_grid(simulator, sweep, size)]


def pareto_frontier(outcomes: list, quality: Callable = lambda outcome: outcome.metric) -> list:
    """The outcomes (or sweep states) that no other beats on both layer speed-up and quality, by increasing speed-up."""
    frontier = []
    best_quality = -np.inf
    for outcome in sorted(outcomes, key=lambda outcome: (-outcome.layer_speedup, -quality(outcome))):
        if quality(outcome) > best_quality:
            frontier.append(outcome)
            best_quality = quality(outcome)
    return frontier[::-1]
