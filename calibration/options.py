"""What pcee-calibrate and pcee-eval can be asked for: typed options that check themselves when built.

The CLIs parse flags into these and check nothing themselves, so a script that builds the options
in Python gets the same checks, each naming the flag, the value received and what is expected.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

from pcee.runtime import BACKEND_NAMES, DEFAULT_POLICY, policy_names

from .calibrate import Objective, not_a_fraction
from .errors import OptionError

POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # also the name of the point's report folder
DEFAULT_BATCH_SIZE = 32
DEFAULT_HOLDOUT_FRACTION = 0.2


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require_integer(name: str, value, smallest: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{flag(name)} must be an integer, got {value!r}")
    if smallest is not None and value < smallest:
        raise OptionError(f"{flag(name)} must be at least {smallest}, got {value}")
    return int(value)


def require_open_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise OptionError(not_a_fraction(flag(name), value))
    return float(value)


def require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(f"{flag(name)} {value!r} is not one of {', '.join(choices)}")


def check_point_name(name: str, value: str | None) -> None:
    if value is not None and not (isinstance(value, str) and POINT_NAME.fullmatch(value)):
        raise OptionError(
            f"{flag(name)} {value!r} cannot name a point and its report folder; use letters, digits, '.', '_' and '-'"
        )


@dataclass(frozen=True)
class LabelledData:
    """--data and how to read it: a GLUE task directory or file, or a generic file with its columns."""

    path: Path
    task: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        for name in ("task", "text_column", "text_pair_column", "label_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise OptionError(f"{flag(name)} must be a non-empty name, got {value!r}")


@dataclass(frozen=True)
class RunSettings:
    """How the bundle runs over the data: --backend and --batch-size."""

    backend: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        require_choice("backend", self.backend, BACKEND_NAMES)
        object.__setattr__(self, "batch_size", require_integer("batch_size", self.batch_size, 1))


@dataclass(frozen=True)
class CalibrationOptions:
    """One pcee-calibrate run: the data, the objective, the policy, the split and where results go."""

    data: LabelledData
    objective: Objective
    policy: str = DEFAULT_POLICY
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    seed: int = 0
    name: str | None = None  # default: the objective's name ('speedup-0.50', 'max-drop-0.01')
    report_dir: Path | None = None  # default: BUNDLE/reports
    run: RunSettings = field(default_factory=RunSettings)
    dry_run: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        require_choice("policy", self.policy, policy_names(calibrated_only=True))
        object.__setattr__(
            self, "holdout_fraction", require_open_fraction("holdout_fraction", self.holdout_fraction)
        )
        object.__setattr__(self, "seed", require_integer("seed", self.seed))
        check_point_name("name", self.name)
        if self.report_dir is not None:
            object.__setattr__(self, "report_dir", Path(self.report_dir))


@dataclass(frozen=True)
class EvaluationOptions:
    """One pcee-eval run: the data, which rows (--holdout-of) and which operating point."""

    data: LabelledData
    run: RunSettings = field(default_factory=RunSettings)
    holdout_of: str | None = None
    report_dir: Path | None = None
    point_name: str | None = None
    policy: str | None = None
    tau: float | None = None
    patience: int | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        check_point_name("holdout_of", self.holdout_of)
        if self.policy is not None:
            require_choice("policy", self.policy, policy_names())
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real)):
            raise OptionError(f"--tau must be a number, got {self.tau!r}")
        for name in ("patience", "layer"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, require_integer(name, getattr(self, name), 1))
        if self.report_dir is not None:
            object.__setattr__(self, "report_dir", Path(self.report_dir))
