"""Exit policies: the PCEE rule and the baselines of the paper, over the same per-layer exit outputs.

Every policy works on arrays of rows, layer by layer. The runtime calls `step` after each
layer on the rows still running; calibration calls the same `step` on all rows of a recorded
N x M array, so simulated and served exit layers are the same by construction.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import PolicyError
from .exits import ExitRecord, RowSelect, softmax

POLICY_NAMES = (
    "pcee",
    "pcee-maxprob",
    "pcee-learned",
    "branchynet",
    "shallow-deep",
    "pabee",
    "budgeted",
    "full",
)
SIGNALS = {
    "pcee": "entropy",
    "branchynet": "entropy",
    "pcee-maxprob": "max_probability",
    "shallow-deep": "max_probability",
    "pcee-learned": "confidence_score",
}
# The exit outputs by the names a prediction reports them under (`exit_signal_name`).
SIGNAL_NAMES = {
    "entropy": "normalized_entropy",
    "max_probability": "max_probability",
    "confidence_score": "learned_score",
}


@dataclass(frozen=True)
class OperatingPoint:
    """A serialisable choice of policy and thresholds; the manifest stores these.

    Types are checked when a point is built, so a bad point never reaches a running policy.
    Ranges depend on the model and are checked by `build_policy`.
    """

    policy: str = "pcee"
    tau: float | None = None
    patience: int | None = None
    layer: int | None = None
    ensemble: bool = False
    name: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str):
            raise PolicyError(
                f"policy must be a policy name (one of {', '.join(POLICY_NAMES)}), got {self.policy!r}"
            )
        if self.tau is not None:
            object.__setattr__(self, "tau", require_real("tau", self.tau))
        for name in ("patience", "layer"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, require_integer(name, getattr(self, name)))
        if not isinstance(self.ensemble, (bool, np.bool_)):
            raise PolicyError(f"ensemble must be true or false, got {self.ensemble!r}")
        object.__setattr__(self, "ensemble", bool(self.ensemble))
        for name in ("name", "source"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise PolicyError(f"operating point {name} must be a string, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """The one serialised form (manifest, reports, server): every field, unset ones as null."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OperatingPoint:
        if not isinstance(data, dict):
            raise PolicyError(f"an operating point must be a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known - {"signal"}
        if unknown:
            raise PolicyError(f"operating point has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        point = cls(**{key: value for key, value in data.items() if key in known})
        point.check_signal(data.get("signal"))
        return point

    def check_signal(self, signal) -> None:
        """Older manifests also name the confidence signal; it must be the one the policy reads."""
        if signal is not None and signal != SIGNALS.get(self.policy):
            raise PolicyError(
                f"operating point {self.describe()} names signal {signal!r}, but policy {self.policy} reads "
                f"{SIGNALS.get(self.policy)!r}; drop the signal field, or pick the policy that reads it"
            )

    def describe(self) -> str:
        parts = [self.policy]
        if self.tau is not None:
            parts.append(f"tau={self.tau:g}")
        if self.patience is not None:
            parts.append(f"patience={self.patience}")
        if self.layer is not None:
            parts.append(f"layer={self.layer}")
        if self.ensemble:
            parts.append("ensemble")
        return " ".join(parts)


@dataclass
class PolicyState(RowSelect):
    """Per-row progress: the policy's counter, the previous argmax (PABEE), the streak's probability sum."""

    counter: np.ndarray
    previous_argmax: np.ndarray
    streak_probabilities: np.ndarray | None = None


@dataclass(frozen=True)
class ExitPolicy:
    """Base: subclasses say which rows exit after a layer and how soon an exit is possible."""

    num_layers: int
    point: OperatingPoint = field(default_factory=OperatingPoint)

    def start(self, num_rows: int, num_labels: int) -> PolicyState:
        streak = np.zeros((num_rows, num_labels), dtype=np.float32) if self.point.ensemble else None
        return PolicyState(np.zeros(num_rows, dtype=np.int64), np.full(num_rows, -1, dtype=np.int64), streak)

    def step(self, state: PolicyState, layer: int, exits: ExitRecord) -> np.ndarray:
        """Update `state` in place after 1-based `layer`; return a bool mask of rows that exit now."""
        raise NotImplementedError

    def layers_until_possible_exit(self, state: PolicyState, layers_done: int) -> int:
        """No row can exit in fewer layers than this: the runtime runs them back to back without a check."""
        return self.num_layers - layers_done

    def exit_probabilities(self, state: PolicyState, exits: ExitRecord, rows: np.ndarray) -> np.ndarray:
        """The prediction of the rows that exit now (the cross-layer ensemble averages the streak)."""
        return softmax(exits.logits[rows])

    def exit_confidence(self, exits: ExitRecord, rows: np.ndarray) -> np.ndarray:
        return exits.entropy[rows]

    @property
    def exit_signal_name(self) -> str:
        """What `exit_confidence` returns, as predictions name it."""
        return SIGNAL_NAMES["entropy"]


@dataclass(frozen=True)
class PatientConfidentPolicy(ExitPolicy):
    """PCEE: count consecutive confident exits; exit when the count reaches the patience.

    entropy: confident when normalized entropy < tau (strict). max_probability: when max p > tau.
    confidence_score: when the learned score > tau.
    """

    signal: str = "entropy"

    def confident(self, exits: ExitRecord) -> np.ndarray:
        tau = self.point.tau
        if self.signal == "entropy":
            return exits.entropy < tau
        if self.signal == "max_probability":
            return exits.max_probability > tau
        return exits.confidence_score > tau

    def step(self, state, layer, exits):
        confident = self.confident(exits)
        state.counter = np.where(confident, state.counter + 1, 0)
        if state.streak_probabilities is not None:
            probabilities = softmax(exits.logits)
            state.streak_probabilities = np.where(
                confident[:, None], state.streak_probabilities + probabilities, 0.0
            )
        return state.counter >= self.point.patience

    def layers_until_possible_exit(self, state, layers_done):
        needed = self.point.patience - (int(state.counter.max()) if state.counter.size else 0)
        return max(1, min(needed, self.num_layers - layers_done))

    def exit_probabilities(self, state, exits, rows):
        if state.streak_probabilities is None:
            return super().exit_probabilities(state, exits, rows)
        return state.streak_probabilities[rows] / self.point.patience

    def exit_confidence(self, exits, rows):
        return getattr(exits, self.signal)[rows]

    @property
    def exit_signal_name(self) -> str:
        return SIGNAL_NAMES[self.signal]


@dataclass(frozen=True)
class PatienceBasedPolicy(ExitPolicy):
    """PABEE: exit when the argmax has stayed the same for `patience` consecutive layers."""

    def step(self, state, layer, exits):
        argmax = exits.logits.argmax(axis=-1)
        state.counter = np.where(argmax == state.previous_argmax, state.counter + 1, 0)
        state.previous_argmax = argmax
        return state.counter >= self.point.patience

    def layers_until_possible_exit(self, state, layers_done):
        if layers_done == 0:
            needed = self.point.patience + 1
        else:
            needed = self.point.patience - (int(state.counter.max()) if state.counter.size else 0)
        return max(1, min(needed, self.num_layers - layers_done))


@dataclass(frozen=True)
class FixedLayerPolicy(ExitPolicy):
    """Budgeted exit: every row leaves at the same layer (the full model is layer M)."""

    def exit_layer(self) -> int:
        return self.point.layer or self.num_layers

    def step(self, state, layer, exits):
        return np.full(len(exits.entropy), layer >= self.exit_layer())

    def layers_until_possible_exit(self, state, layers_done):
        return max(1, self.exit_layer() - layers_done)


def build_policy(
    point: OperatingPoint | dict, num_layers: int, has_learned_score: bool = False
) -> ExitPolicy:
    """Validate an operating point against the model and build its policy."""
    point = OperatingPoint.from_dict(point) if isinstance(point, dict) else point
    if point.policy not in POLICY_NAMES:
        raise PolicyError(f"unknown policy {point.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
    if point.policy in ("branchynet", "shallow-deep"):
        point = replace(point, patience=1 if point.patience is None else point.patience)
    if point.policy in SIGNALS:
        return build_confidence_policy(point, num_layers, has_learned_score)
    if point.policy == "pabee":
        require_patience(point, num_layers - 1)
        return PatienceBasedPolicy(num_layers, point)
    if point.policy == "budgeted":
        if point.layer is None or not 1 <= point.layer <= num_layers:
            raise PolicyError(f"budgeted exit needs layer in 1..{num_layers}, got {point.layer!r}")
        return FixedLayerPolicy(num_layers, point)
    return FixedLayerPolicy(num_layers, replace(point, layer=num_layers))


def build_confidence_policy(
    point: OperatingPoint, num_layers: int, has_learned_score: bool
) -> PatientConfidentPolicy:
    signal = SIGNALS[point.policy]
    if signal == "confidence_score" and not has_learned_score:
        raise PolicyError(
            "policy pcee-learned needs a model trained with --learned-confidence; this bundle has no learned score"
        )
    if point.tau is None or not np.isfinite(point.tau):
        raise PolicyError(f"policy {point.policy} needs a finite tau, got {point.tau!r}")
    if signal == "entropy" and not 0.0 <= point.tau <= 1.0:
        raise PolicyError(f"normalized entropy lies in [0, 1]; tau={point.tau} is outside it")
    require_patience(point, num_layers)
    if point.policy in ("branchynet", "shallow-deep") and point.patience != 1:
        raise PolicyError(
            f"{point.policy} is PCEE with patience 1; got patience {point.patience}. Use pcee / pcee-maxprob instead"
        )
    return PatientConfidentPolicy(num_layers, point, signal)


def require_patience(point: OperatingPoint, largest: int) -> None:
    if point.patience is None or not 1 <= point.patience <= largest:
        raise PolicyError(
            f"policy {point.policy} needs an integer patience in 1..{largest}, got {point.patience!r}"
        )


def require_real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise PolicyError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def require_integer(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise PolicyError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)
