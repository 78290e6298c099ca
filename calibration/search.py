"""Operating-point search over simulated exits: sweeps, target speed-up, Pareto frontiers.

A sweep turns one knob of a policy from its most conservative to its most aggressive setting,
so layer speed-up never decreases along it: tau at a fixed patience (a larger entropy threshold,
or a smaller max-probability / learned-score threshold, makes more rows confident, so every
patience counter is at least as large at every layer), PABEE's patience downwards, the budgeted
layer downwards. That monotonicity is what lets the target search bisect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pcee.runtime.engine import AllExits
from pcee.runtime.policies import SIGNALS, OperatingPoint

from .errors import CalibrationError
from .simulate import Outcome, Simulator

CALIBRATION_POLICIES = ("pcee", "pcee-maxprob", "pcee-learned", "pabee", "branchynet", "shallow-deep", "budgeted")
PATIENCE_ONE_POLICIES = ("branchynet", "shallow-deep")
BOUNDED_SIGNALS = ("entropy", "max_probability")  # both lie in [0, 1]
# Endpoint thresholds sit this far beyond the observed values: all rows confident, or none.
ENDPOINT_MARGIN = 1e-6
SPEEDUP_TOLERANCE = 1e-12


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


def candidate_thresholds(signal: str, values: np.ndarray) -> np.ndarray:
    """Thresholds that split the observed signal values every possible way, most conservative first.

    Midpoints between consecutive distinct values (so a recorded value never sits on the
    threshold, whatever float noise the deployed backend adds), plus one beyond each end.
    """
    distinct = np.unique(np.asarray(values, dtype=np.float64))
    thresholds = np.concatenate([[distinct[0] - ENDPOINT_MARGIN], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + ENDPOINT_MARGIN]])
    if signal in BOUNDED_SIGNALS:
        thresholds = np.unique(np.clip(thresholds, 0.0, 1.0))
    # Entropy is confident below tau (larger is more aggressive); the others above tau.
    return thresholds if signal == "entropy" else thresholds[::-1]


def sweeps_for(policy: str, exits: AllExits) -> list[Sweep]:
    """Every sweep of `policy` over the thresholds these exits make distinguishable."""
    num_layers = exits.logits.shape[1]
    if policy in SIGNALS:
        signal = SIGNALS[policy]
        values = getattr(exits, signal)
        if values is None:
            raise CalibrationError(f"policy {policy} needs a learned confidence score; this bundle has none. Choose pcee or pcee-maxprob")
        taus = candidate_thresholds(signal, values)
        patiences = [1] if policy in PATIENCE_ONE_POLICIES else range(1, num_layers + 1)
        return [Sweep(policy, "tau", taus, patience) for patience in patiences]
    if policy == "pabee":
        if num_layers < 2:
            raise CalibrationError("pabee compares consecutive layers and needs a model with at least 2 layers")
        return [Sweep(policy, "patience", np.arange(num_layers - 1, 0, -1))]
    if policy == "budgeted":
        return [Sweep(policy, "layer", np.arange(num_layers, 0, -1))]
    raise CalibrationError(f"policy {policy!r} cannot be calibrated; choose one of {', '.join(CALIBRATION_POLICIES)}")


def first_reaching(sweep: Sweep, simulator: Simulator, target: float) -> Outcome | None:
    """The most conservative point of the sweep whose layer speed-up reaches `target`, or None.

    Bisection over the sweep's indices: each step is one simulation.
    """
    low, high = 0, len(sweep) - 1
    best = simulator.run(sweep.point(high))
    if best.layer_speedup < target - SPEEDUP_TOLERANCE:
        return None
    while low < high:
        middle = (low + high) // 2
        outcome = simulator.run(sweep.point(middle))
        if outcome.layer_speedup >= target - SPEEDUP_TOLERANCE:
            high, best = middle, outcome
        else:
            low = middle + 1
    return best


def search_target(simulator: Simulator, sweeps: list[Sweep], target: float) -> Outcome:
    """Per sweep, the most conservative point reaching the target; of those, the best metric."""
    reached = [outcome for sweep in sweeps if (outcome := first_reaching(sweep, simulator, target)) is not None]
    if not reached:
        low, high = reachable_range(simulator, sweeps)
        raise CalibrationError(
            f"target layer speed-up {target:g} is out of reach for policy {sweeps[0].policy} on these "
            f"{len(simulator.rows)} rows: reachable layer speed-ups are {low:.4f} to {high:.4f}. "
            "Ask for a target in that range, or choose another policy"
        )
    return max(reached, key=lambda outcome: (outcome.metric, outcome.layer_speedup))


def reachable_range(simulator: Simulator, sweeps: list[Sweep]) -> tuple[float, float]:
    low = min(simulator.run(sweep.point(0)).layer_speedup for sweep in sweeps)
    high = max(simulator.run(sweep.point(len(sweep) - 1)).layer_speedup for sweep in sweeps)
    return low, high


def sweep_grid(simulator: Simulator, sweep: Sweep, size: int) -> list[Outcome]:
    """At most `size` points spread evenly along the sweep's candidate list, both ends included."""
    indices = np.unique(np.linspace(0, len(sweep) - 1, size).round().astype(int))
    return [simulator.run(sweep.point(index)) for index in indices]


def grid_outcomes(simulator: Simulator, sweeps: list[Sweep], size: int) -> list[Outcome]:
    return [outcome for sweep in sweeps for outcome in sweep_grid(simulator, sweep, size)]


def pareto_frontier(outcomes: list[Outcome], quality: Callable[[Outcome], float] = lambda outcome: outcome.metric) -> list[Outcome]:
    """The outcomes that no other beats on both layer speed-up and quality, by increasing speed-up."""
    frontier: list[Outcome] = []
    best_quality = -np.inf
    for outcome in sorted(outcomes, key=lambda outcome: (-outcome.layer_speedup, -quality(outcome))):
        if quality(outcome) > best_quality:
            frontier.append(outcome)
            best_quality = quality(outcome)
    return frontier[::-1]
