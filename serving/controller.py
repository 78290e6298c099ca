"""The latency controller: serve the most accurate saved point that holds the p99 target, on its own.

A ladder of saved points runs from most accurate to fastest. Every tick the controller looks at
the rolling p99 of request latency (arrival to answer) and at how long the oldest queued
request has waited. It steps one point faster when either passes `step_down_at` x target,
and one point more accurate when both are under `step_up_below` x target. The gap between the
two ratios is the hysteresis. After a switch it holds for `dwell_s`, and it judges the new point
on its own latencies only, so one slow spell moves it one step, not down the whole ladder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcee.runtime import EarlyExitRuntime, PolicyError

from .metrics import ServingMetrics

log = logging.getLogger("pcee.serving")
CALIBRATION_REPORT = Path("reports") / "{name}" / "calibration-report.json"  # pcee-calibrate writes it


@dataclass(frozen=True)
class ControllerSettings:
    slo_p99_ms: float
    points: tuple[str, ...]  # saved point names, most accurate first
    dwell_s: float = 10.0
    window_s: float = 10.0
    step_down_at: float = 0.9
    step_up_below: float = 0.5
    min_samples: int = 20

    def __post_init__(self) -> None:
        if len(self.points) < 2 or len(set(self.points)) != len(self.points):
            raise ValueError(
                f"the adaptive ladder needs two or more distinct saved points, got {list(self.points)}"
            )
        if not self.slo_p99_ms > 0:
            raise ValueError(f"the p99 target must be positive, got {self.slo_p99_ms!r} ms")
        if not 0 < self.step_up_below < self.step_down_at:
            raise ValueError(
                f"need 0 < step_up_below ({self.step_up_below}) < step_down_at ({self.step_down_at})"
            )

    @property
    def tick_s(self) -> float:
        return min(1.0, self.dwell_s / 5)


class LatencyWindow:
    """Latencies of the last `seconds`, at most `max_samples` of them."""

    def __init__(self, seconds: float, max_samples: int = 100_000):
        self.seconds = seconds
        self.samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, latency: float, now: float) -> None:
        self.samples.append((now, latency))

    def p99(self, now: float, min_samples: int) -> float | None:
        """None while the window holds fewer than `min_samples` (too little traffic to judge)."""
        while self.samples and self.samples[0][0] < now - self.seconds:
            self.samples.popleft()
        if len(self.samples) < min_samples:
            return None
        return float(np.percentile([latency for _, latency in self.samples], 99))

    def clear(self) -> None:
        self.samples.clear()


class AdaptiveController:
    def __init__(
        self,
        settings: ControllerSettings,
        switch: Callable[[str], None],
        oldest_wait: Callable[[], float],
        metrics: ServingMetrics,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.switch = switch
        self.oldest_wait = oldest_wait
        self.metrics = metrics
        self.clock = clock
        self.level = 0  # index into the ladder: 0 is the most accurate point
        self.window = LatencyWindow(settings.window_s)
        self.last_switch = clock()

    def observe(self, latency_seconds: float) -> None:
        self.window.add(latency_seconds, self.clock())

    def next_level(self) -> int | None:
        """The level to move to now, or None to stay."""
        settings, now = self.settings, self.clock()
        p99 = self.window.p99(now, settings.min_samples)
        self.metrics.adaptive_p99_seconds.set(float("nan") if p99 is None else p99)
        if now - self.last_switch < settings.dwell_s:
            return None
        target = settings.slo_p99_ms / 1000.0
        worst = max(p99 or 0.0, self.oldest_wait())
        if worst > settings.step_down_at * target and self.level < len(settings.points) - 1:
            return self.level + 1
        if worst < settings.step_up_below * target and self.level > 0:
            return self.level - 1
        return None

    def step(self) -> None:
        level = self.next_level()
        if level is None:
            return
        self.switch(self.settings.points[level])
        self.level = level
        self.metrics.adaptive_level.set(level)
        self.window.clear()
        self.last_switch = self.clock()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            self.step()


# -- the ladder's order ------------------------------------------------------------------------------
def expected_speedup(runtime: EarlyExitRuntime, name: str) -> float | None:
    """A point's layer speed-up: exact for a point whose policy exits every row at one layer (`full`,
    budgeted), else the one its calibration report measured (None when the bundle holds no report for it)."""
    exit_layer = runtime.build_checked_policy(runtime.resolve_operating_point(name)).fixed_exit_layer()
    if exit_layer is not None:
        return 1.0 - exit_layer / runtime.num_layers
    report = runtime.bundle_dir / str(CALIBRATION_REPORT).format(name=name)
    try:
        return float(json.loads(report.read_text())["calibration"]["layer_speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_ladder_order(runtime: EarlyExitRuntime, names: tuple[str, ...]) -> None:
    """Refuse a ladder whose known speed-ups do not rise from the first point to the last."""
    speedups = {name: expected_speedup(runtime, name) for name in names}
    unknown = [name for name, speedup in speedups.items() if speedup is None]
    if unknown:
        log.warning(
            "the adaptive ladder's order cannot be checked for %s: no calibration report under %s",
            unknown,
            runtime.bundle_dir / "reports",
        )
    known = [(name, speedup) for name, speedup in speedups.items() if speedup is not None]
    for (before, slower), (after, faster) in zip(known, known[1:]):
        if faster < slower:
            ordered = ",".join(name for name, _ in sorted(known, key=lambda item: item[1]))
            raise PolicyError(
                f"--adaptive-points runs from the most accurate point to the fastest, but {after!r} "
                f"(layer speed-up {faster:.3f}) comes after {before!r} ({slower:.3f}); "
                f"by their speed-ups the order is --adaptive-points {ordered}"
            )
