"""Cross-request batching: rows of concurrent requests share one runtime call, run off the event loop.

Requests wait in one FIFO queue. The worker takes the oldest request's group (same operating
point), waits up to `max_wait` for the group to fill `max_batch_size` rows, runs one
`predict` in its own thread, and hands each request exactly its rows. One batch runs at a time:
rows that arrive meanwhile form the next, larger batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pcee.runtime import InputError, OperatingPoint, PredictionResult

from .errors import PayloadTooLarge, Unavailable
from .metrics import ServingMetrics
from .protocol import ClassifyRequest

Predict = Callable[[list[str], "list[str] | None", OperatingPoint], PredictionResult]
Outcome = PredictionResult | Exception
Observe = Callable[[PredictionResult], None]


@dataclass
class Pending:
    request: ClassifyRequest
    point: OperatingPoint
    future: asyncio.Future
    admitted: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple[OperatingPoint, bool]:
        """Only requests with the same point (and pairing) can share a runtime call."""
        return self.point, self.request.text_pairs is not None


class Batcher:
    def __init__(
        self,
        predict: Predict,
        metrics: ServingMetrics,
        max_batch_size: int,
        max_wait_seconds: float,
        max_queue_rows: int,
    ):
        self.predict = predict
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.max_queue_rows = max_queue_rows
        self.accepting = True
        self.queued_rows = 0
        self._pending: deque[Pending] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcee-batch")
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work(), name="pcee-batcher")

    def stop_accepting(self) -> None:
        """Refuse new rows and stop waiting for a batch to fill. Safe to call from a signal handler."""
        self.accepting = False
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._arrived.set)

    async def close(self) -> None:
        """Answer every admitted request, then stop the worker and its thread."""
        self.accepting = False
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, request: ClassifyRequest, point: OperatingPoint) -> PredictionResult:
        self.admit(request.rows)
        pending = Pending(request, point, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self._set_queued(self.queued_rows + request.rows)
        self._arrived.set()
        return await pending.future

    def admit(self, rows: int) -> None:
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry on another replica")
        if rows > self.max_queue_rows:
            raise PayloadTooLarge(
                f"the request has {rows} rows; this server takes at most {self.max_queue_rows} per request (--max-queue)"
            )
        if self.queued_rows + rows > self.max_queue_rows:
            raise Unavailable(
                f"overloaded: {self.queued_rows} rows are waiting (--max-queue {self.max_queue_rows}); retry shortly"
            )

    def oldest_wait_seconds(self) -> float:
        return time.monotonic() - self._pending[0].admitted if self._pending else 0.0

    def _set_queued(self, rows: int) -> None:
        self.queued_rows = rows
        self.metrics.queue_rows.set(rows)

    async def _work(self) -> None:
        while await self._wait_for_rows():
            batch = await self._gather()
            await self._run(batch)

    async def _wait_for_rows(self) -> bool:
        """True once a request waits; False when closed with nothing left to answer."""
        while not self._pending:
            if not self.accepting:
                return False
            self._arrived.clear()
            await self._arrived.wait()
        return True

    async def _gather(self) -> list[Pending]:
        group = self._pending[0].group
        deadline = self._pending[0].admitted + self.max_wait_seconds
        while self.accepting and self._rows_in(group) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._take(group)

    def _rows_in(self, group) -> int:
        return sum(pending.request.rows for pending in self._pending if pending.group == group)

    def _take(self, group) -> list[Pending]:
        """The oldest requests of `group` up to max_batch_size rows (at least one request, however large)."""
        taken, rows, kept = [], 0, deque()
        for pending in self._pending:
            fits = not taken or rows + pending.request.rows <= self.max_batch_size
            if pending.group == group and fits:
                taken.append(pending)
                rows += pending.request.rows
            else:
                kept.append(pending)
        self._pending = kept
        self._set_queued(self.queued_rows - rows)
        return taken

    async def _run(self, batch: list[Pending]) -> None:
        started = time.monotonic()
        for pending in batch:
            self.metrics.queue_wait_seconds.observe(started - pending.admitted)
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._predict_batch, batch
            )
        except Exception as error:  # a backend failure: every request of the batch gets it (answered as 500)
            outcomes = [error] * len(batch)
        for pending, outcome in zip(batch, outcomes):
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    def _predict_batch(self, batch: list[Pending]) -> list[Outcome]:
        return predict_each(
            self.predict, [pending.request for pending in batch], batch[0].point, self.metrics.observe_batch
        )


def predict_each(
    predict: Predict, requests: list[ClassifyRequest], point: OperatingPoint, observe: Observe
) -> list[Outcome]:
    """Each request's own rows, from one runtime call for all of them (same point and pairing).

    If a row is bad, each request runs alone, so only its sender gets the 400 (its outcome is the error).
    """
    try:
        return split_rows(predict_joined(predict, requests, point, observe), requests)
    except InputError:
        if len(requests) == 1:
            raise
    return [predict_alone(predict, request, point, observe) for request in requests]


def predict_joined(
    predict: Predict, requests: list[ClassifyRequest], point: OperatingPoint, observe: Observe
) -> PredictionResult:
    texts = [text for request in requests for text in request.texts]
    pairs = None
    if requests[0].text_pairs is not None:
        pairs = [pair for request in requests for pair in request.text_pairs]
    result = predict(texts, pairs, point)
    observe(result)
    return result


def predict_alone(
    predict: Predict, request: ClassifyRequest, point: OperatingPoint, observe: Observe
) -> Outcome:
    try:
        return predict_joined(predict, [request], point, observe)
    except InputError as error:
        return error


def split_rows(result: PredictionResult, requests: list[ClassifyRequest]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    start = 0
    for request in requests:
        rows = result.predictions[start : start + request.rows]
        start += request.rows
        outcomes.append(
            PredictionResult(
                predictions=rows,
                layers_run=sum(row.exit_layer for row in rows),
                num_layers=result.num_layers,
                elapsed_seconds=result.elapsed_seconds,
                operating_point=result.operating_point,
            )
        )
    return outcomes
