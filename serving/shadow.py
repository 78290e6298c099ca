"""Drift watch: a random fraction of served rows runs again on the full model, off the request path.

The rolling agreement between the served (early-exit) label and the full model's label shows
in /metrics. Calibration measured it on its own data; when live traffic drifts away from that
data, the agreement falls.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .metrics import ServingMetrics
from .protocol import ClassifyRequest

log = logging.getLogger("pcee.serving")

FullModelLabels = Callable[[list[str], "list[str] | None"], list[int]]


@dataclass(frozen=True)
class ShadowRow:
    text: str
    pair: str | None
    served_label: int


class ShadowWatch:
    def __init__(
        self,
        fraction: float,
        full_model_labels: FullModelLabels,
        metrics: ServingMetrics,
        batch_rows: int,
        window_rows: int = 1000,
        max_backlog: int = 4096,
    ):
        self.fraction = fraction
        self.full_model_labels = full_model_labels
        self.metrics = metrics
        self.batch_rows = batch_rows
        self.agreements: deque[bool] = deque(maxlen=window_rows)
        self.backlog: deque[ShadowRow] = deque()
        self.max_backlog = max_backlog
        self.random = random.Random()
        self._offered = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcee-shadow")

    def offer(self, request: ClassifyRequest, served_labels: list[int]) -> None:
        """Sample rows of an answered request; past the backlog bound, rows are dropped and counted."""
        pairs = request.text_pairs or [None] * request.rows
        for text, pair, label in zip(request.texts, pairs, served_labels):
            if self.random.random() >= self.fraction:
                continue
            if len(self.backlog) >= self.max_backlog:
                self.metrics.shadow_dropped_rows.inc()
                continue
            self.backlog.append(ShadowRow(text, pair, label))
        if self.backlog:
            self._offered.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._offered.wait()
            self._offered.clear()
            while self.backlog:
                rows = [self.backlog.popleft() for _ in range(min(self.batch_rows, len(self.backlog)))]
                try:
                    await loop.run_in_executor(self._executor, self.compare, rows)
                except Exception:  # the watch must never take the server down with it
                    log.exception("shadow comparison of %d rows failed", len(rows))

    def close(self) -> None:
        """Blocks until a comparison in flight is done, so the runtime can be closed after it."""
        self._executor.shutdown(wait=True)

    def compare(self, rows: list[ShadowRow]) -> None:
        pairs = None if rows[0].pair is None else [row.pair for row in rows]
        full_labels = self.full_model_labels([row.text for row in rows], pairs)
        agreed = [row.served_label == label for row, label in zip(rows, full_labels)]
        self.agreements.extend(agreed)
        self.metrics.shadow_rows.inc(len(rows))
        self.metrics.shadow_agreed_rows.inc(sum(agreed))
        self.metrics.shadow_agreement.set(sum(self.agreements) / len(self.agreements))
