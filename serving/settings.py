"""What one `pcee-serve` process is configured with (the CLI's options, as one value)."""

from __future__ import annotations

from dataclasses import dataclass

from .controller import ControllerSettings

DEFAULT_MAX_BODY_BYTES = 1 << 20
# After SIGTERM, the drain keeps this much of --drain-timeout-s (at most 2 s) for writing the last
# answers, closing the runtime and exiting, so the process is gone within the timeout.
DRAIN_EXIT_MARGIN_S, DRAIN_EXIT_SHARE = 2.0, 0.5


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = 10.0
    max_queue_wait_ms: float = 5000.0  # 0: no limit
    drain_timeout_s: float = 30.0
    operating_point: str | None = None
    admin_token: str | None = None
    shadow_fraction: float = 0.01
    controller: ControllerSettings | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_wait_ms", "body_timeout_s", "max_queue_wait_ms", "drain_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not 0 <= self.shadow_fraction <= 1:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {self.shadow_fraction!r}")
        if self.controller is not None and self.operating_point is not None:
            raise ValueError("give a fixed operating point or an adaptive ladder, not both")
        if self.admin_token == "":
            object.__setattr__(self, "admin_token", None)  # an empty token would let an empty bearer in

    @property
    def starting_point(self) -> str | None:
        return self.controller.points[0] if self.controller is not None else self.operating_point

    @property
    def max_wait_seconds(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def drain_seconds(self) -> float:
        """How long admitted requests may run after SIGTERM: the drain timeout less a margin to answer and exit in."""
        return self.drain_timeout_s - min(DRAIN_EXIT_MARGIN_S, DRAIN_EXIT_SHARE * self.drain_timeout_s)
