"""Exit policies: the PCEE rule and the baselines of the paper, over the same per-layer exit outputs.

Every policy works on arrays of rows, layer by layer. The runtime calls `step` after each
layer on the rows still running; calibration calls the same `step` on all rows of a recorded
N x M array, so simulated and served exit layers are the same by construction.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import numpy as np

from .errors import PolicyError
from .exits import ExitRecord, RowSelect, softmax

DEFAULT_POLICY = "pcee"  # the paper's rule: a new operating point's policy unless one is named
FULL_POLICY = "full"  # every row runs every layer
PABEE_POLICY = "pabee"  # the patience-only baseline the benchmarks compare PCEE with
BUDGETED_POLICY = "budgeted"  # every row leaves at one chosen layer


@dataclass(frozen=True)
class Signal:
    """A per-exit confidence value (a field of ExitRecord / AllExits) that a threshold policy compares with tau."""

    name: str
    confident_below: bool  # entropy: confident when the value < tau; the others when it is > tau
    unit_interval: bool  # the values, so the meaningful taus, lie in [0, 1]
    description: str


CONFIDENCE_SIGNALS = {
    signal.name: signal
    for signal in (
        Signal("entropy", confident_below=True, unit_interval=True, description="normalized entropy"),
        Signal("max_probability", confident_below=False, unit_interval=True, description="max probability"),
        Signal("confidence_score", confident_below=False, unit_interval=False, description="learned score"),
    )
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

    policy: str = DEFAULT_POLICY
    tau: float | None = None
    patience: int | None = None
    layer: int | None = None
    ensemble: bool = False
    name: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str):
            raise PolicyError(
                f"policy must be a policy name (one of {', '.join(policy_names())}), got {self.policy!r}"
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
        spec = POLICIES.get(self.policy)
        read = spec.signal if spec is not None else None
        if signal is not None and signal != read:
            raise PolicyError(
                f"operating point {self.describe()} names signal {signal!r}, but policy {self.policy} reads "
                f"{read!r}; drop the signal field, or pick the policy that reads it"
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
    signal: str | None = None  # threshold policies: the CONFIDENCE_SIGNALS entry compared with tau
    # True where a row exits at the end of its first run of `patience` confident layers (PCEE's rule):
    # calibration then lists a tau sweep's states from the recorded confidences alone.
    exits_on_confident_streak: ClassVar[bool] = False

    def start(self, num_rows: int, num_labels: int) -> PolicyState:
        streak = np.zeros((num_rows, num_labels), dtype=np.float32) if self.point.ensemble else None
        return PolicyState(np.zeros(num_rows, dtype=np.int64), np.full(num_rows, -1, dtype=np.int64), streak)

    def step(self, state: PolicyState, layer: int, exits: ExitRecord) -> np.ndarray:
        """Update `state` in place after 1-based `layer`; return a bool mask of rows that exit now."""
        raise NotImplementedError

    def layers_until_possible_exit(self, state: PolicyState, layers_done: int) -> int:
        """No row can exit in fewer layers than this: the runtime runs them back to back without a check."""
        return self.num_layers - layers_done

    def fixed_exit_layer(self) -> int | None:
        """The layer every row leaves at, for a policy that does not look at the exits; None otherwise."""
        return None

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

    exits_on_confident_streak: ClassVar[bool] = True

    def confident(self, exits: ExitRecord) -> np.ndarray:
        values = getattr(exits, self.signal)
        return (
            values < self.point.tau
            if CONFIDENCE_SIGNALS[self.signal].confident_below
            else values > self.point.tau
        )

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

    def step(self, state, layer, exits):
        return np.full(len(exits.entropy), layer >= self.fixed_exit_layer())

    def layers_until_possible_exit(self, state, layers_done):
        return max(1, self.fixed_exit_layer() - layers_done)

    def fixed_exit_layer(self) -> int:
        return self.point.layer or self.num_layers


# ------------------------------------------------------------------------------ the registry

LayerCount = Callable[[int], int]  # the model's number of layers -> a knob's bound
DEEP_MODEL_LAYERS = 48


@dataclass(frozen=True)
class Knob:
    """An integer knob of a policy (patience or layer) and its allowed values on a model of M layers.

    Larger values are more conservative (fewer rows exit, or later), so a calibration sweep turns
    the knob from its largest value down to its smallest.
    """

    name: str  # the OperatingPoint field
    smallest: LayerCount
    largest: LayerCount
    default: LayerCount | None = None  # the value of a point that leaves the knob unset; None: required
    fixed: bool = False  # the value is always the default, whatever the point says

    def values(self, num_layers: int) -> range:
        """Every allowed value, most conservative first."""
        return range(self.largest(num_layers), self.smallest(num_layers) - 1, -1)

    def resolve(self, point: OperatingPoint, num_layers: int, hint: str = "") -> OperatingPoint:
        """The point with this knob set (its default where unset) and checked against its range."""
        value = getattr(point, self.name)
        if self.fixed or (value is None and self.default is not None):
            return replace(point, **{self.name: self.default(num_layers)})
        low, high = self.smallest(num_layers), self.largest(num_layers)
        if value is not None and low <= value <= high:
            return point
        if low == high:
            raise PolicyError(f"policy {point.policy} takes {self.name} {low} only, got {value!r}{hint}")
        raise PolicyError(
            f"policy {point.policy} needs an integer {self.name} in {low}..{high}, got {value!r}{hint}"
        )


def one(num_layers: int) -> int:
    return 1


def every_layer(num_layers: int) -> int:
    return num_layers


def all_but_one_layer(num_layers: int) -> int:
    return num_layers - 1


ANY_PATIENCE = Knob("patience", one, every_layer)
PATIENCE_ONE = Knob("patience", one, one, default=one)


@dataclass(frozen=True)
class PolicySpec:
    """Everything the project knows about one exit policy; `build_policy`, calibration, the CLIs and the
    benchmarks read it from POLICIES, so a new policy is its class plus one `register_policy` call.

    A threshold policy (`signal` set) has a tau; calibration sweeps tau exactly over the recorded
    signal values, once per allowed patience. Other policies are swept along their one integer knob.
    """

    name: str
    label: str  # display label in tables and plots
    policy_class: type[ExitPolicy]
    signal: str | None = None  # the CONFIDENCE_SIGNALS entry a threshold policy compares with tau
    knobs: tuple[Knob, ...] = ()
    needs_learned_score: bool = False
    calibrated: bool = True  # pcee-calibrate searches it and draws its frontier
    table_rank: int = 0  # the study's row order (the paper's Table 2)

    @property
    def swept(self) -> str | None:
        """The knob a calibration sweep turns: tau, or the policy's one integer knob; None for no knob."""
        if self.signal is not None:
            return "tau"
        return self.knobs[0].name if self.knobs else None

    def knob(self, name: str) -> Knob | None:
        return next((knob for knob in self.knobs if knob.name == name), None)

    @property
    def allows_patience(self) -> bool:
        """Whether its patience can exceed 1 on a deep enough model (then the chosen patience varies)."""
        patience = self.knob("patience")
        return patience is not None and patience.largest(DEEP_MODEL_LAYERS) > 1

    def build(self, point: OperatingPoint, num_layers: int, has_learned_score: bool) -> ExitPolicy:
        if self.needs_learned_score and not has_learned_score:
            raise PolicyError(
                f"policy {self.name} needs a model trained with --learned-confidence; this bundle has no learned score"
            )
        if self.signal is not None:
            check_tau(point, CONFIDENCE_SIGNALS[self.signal])
        for knob in self.knobs:
            point = knob.resolve(point, num_layers, self.knob_hint(knob, num_layers))
        return self.policy_class(num_layers, point, self.signal)

    def knob_hint(self, knob: Knob, num_layers: int) -> str:
        """Where a knob has a single value: the policies with the same signal that free it."""
        if knob.smallest(num_layers) != knob.largest(num_layers) or self.signal is None:
            return ""
        freer = [
            spec.name
            for spec in POLICIES.values()
            if spec.signal == self.signal
            and spec.knob(knob.name)
            and spec.knob(knob.name).fixed is False
            and spec.knob(knob.name).largest(num_layers) > knob.largest(num_layers)
        ]
        return f"; use {' / '.join(freer)} for another {knob.name}" if freer else ""


POLICIES: dict[str, PolicySpec] = {}


def register_policy(spec: PolicySpec) -> PolicySpec:
    if spec.name in POLICIES:
        raise PolicyError(f"a policy named {spec.name!r} is already registered")
    if spec.signal is not None and spec.signal not in CONFIDENCE_SIGNALS:
        raise PolicyError(
            f"policy {spec.name} reads signal {spec.signal!r}; known signals: {', '.join(CONFIDENCE_SIGNALS)}"
        )
    POLICIES[spec.name] = spec
    return spec


def policy_names(calibrated_only: bool = False) -> tuple[str, ...]:
    return tuple(name for name, spec in POLICIES.items() if spec.calibrated or not calibrated_only)


def policy_spec(name: str) -> PolicySpec:
    try:
        return POLICIES[name]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None


for registered in (
    PolicySpec(
        DEFAULT_POLICY, "PCEE (entropy)", PatientConfidentPolicy, "entropy", (ANY_PATIENCE,), table_rank=5
    ),
    PolicySpec(
        "pcee-maxprob",
        "PCEE max-prob (v1)",
        PatientConfidentPolicy,
        "max_probability",
        (ANY_PATIENCE,),
        table_rank=6,
    ),
    PolicySpec(
        "pcee-learned",
        "PCEE learned score (v2)",
        PatientConfidentPolicy,
        "confidence_score",
        (ANY_PATIENCE,),
        needs_learned_score=True,
        table_rank=7,
    ),
    PolicySpec(
        PABEE_POLICY,
        "PABEE",
        PatienceBasedPolicy,
        None,
        (Knob("patience", one, all_but_one_layer),),
        table_rank=4,
    ),
    PolicySpec("branchynet", "BranchyNet", PatientConfidentPolicy, "entropy", (PATIENCE_ONE,), table_rank=2),
    PolicySpec(
        "shallow-deep",
        "Shallow-Deep",
        PatientConfidentPolicy,
        "max_probability",
        (PATIENCE_ONE,),
        table_rank=3,
    ),
    PolicySpec(
        BUDGETED_POLICY,
        "Budgeted exit",
        FixedLayerPolicy,
        None,
        (Knob("layer", one, every_layer),),
        table_rank=1,
    ),
    PolicySpec(
        FULL_POLICY,
        "Full model",
        FixedLayerPolicy,
        None,
        (Knob("layer", every_layer, every_layer, default=every_layer, fixed=True),),
        calibrated=False,
        table_rank=8,
    ),
):
    register_policy(registered)


def build_policy(
    point: OperatingPoint | dict, num_layers: int, has_learned_score: bool = False
) -> ExitPolicy:
    """Validate an operating point against the model and build its policy."""
    point = OperatingPoint.from_dict(point) if isinstance(point, dict) else point
    return policy_spec(point.policy).build(point, num_layers, has_learned_score)


def check_tau(point: OperatingPoint, signal: Signal) -> None:
    if point.tau is None or not np.isfinite(point.tau):
        raise PolicyError(f"policy {point.policy} needs a finite tau, got {point.tau!r}")
    if signal.unit_interval and not 0.0 <= point.tau <= 1.0:
        raise PolicyError(f"{signal.description} lies in [0, 1]; tau={point.tau} is outside it")


def require_real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise PolicyError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def require_integer(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise PolicyError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)
