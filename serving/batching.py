"""Cross-request batching of already-encoded rows, run off the event loop, with deadlines and a drain.

Requests are validated and tokenized when they are admitted (`InferenceService.classify`), so a
bad text is refused before it can share a batch. Admitted jobs wait in one FIFO queue. The worker
takes the oldest job's group (same operating point), waits up to `max_wait` for the group to fill
`max_batch_size` rows, joins their token arrays into one `predict_encoded` call in its own thread,
and hands each job exactly its rows. One batch runs at a time: rows that arrive meanwhile form
the next, larger batch.

A job leaves the queue without running when its deadline passes (the server's
--max-queue-wait-ms or the request's own timeout, both counted from the request's arrival), when
its client disconnects, or when a drain runs out of time; each is answered (or, for a departed
client, just dropped) and counted in `pcee_requests_dropped_total{reason}`. A request whose
deadline has passed when it is admitted, or will have before the rows queued ahead of it have run
(at the recent batches' seconds per row), is refused the same way at once; one whose deadline
passes while the event loop is late to fire its timer is never taken into a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pcee.runtime import EncodedBatch, OperatingPoint, PredictionResult

from .errors import ClientClosedRequest, GatewayTimeout, PayloadTooLarge, ServingError, Unavailable
from .metrics import ServingMetrics

PredictEncoded = Callable[[EncodedBatch, OperatingPoint], PredictionResult]
Observe = Callable[[PredictionResult], None]

# reasons in pcee_requests_dropped_total
QUEUE_WAIT, REQUEST_TIMEOUT, CLIENT_DISCONNECTED, SHUTDOWN = (
    "queue_wait",
    "request_timeout",
    "client_disconnected",
    "shutdown",
)


ROW_SECONDS_WEIGHT = 0.2  # of the newest batch in the moving average of seconds per row


@dataclass(frozen=True)
class Deadline:
    """When a job must have started running (counted from the request's arrival), and why (which limit set it)."""

    at: float  # time.monotonic()
    reason: str  # QUEUE_WAIT or REQUEST_TIMEOUT
    limit_ms: float

    def passed(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.at

    def expired_error(self, queued_ahead_s: float | None = None) -> ServingError:
        """The answer to a request this deadline stops; `queued_ahead_s`: refused at once, because the
        rows queued ahead of it would take that long, past the deadline."""
        when = "did not start" if queued_ahead_s is None else "would not start"
        ahead = (
            ""
            if queued_ahead_s is None
            else f" (the rows queued ahead take about {queued_ahead_s * 1000:.0f} ms)"
        )
        if self.reason == QUEUE_WAIT:
            return Unavailable(
                f"overloaded: the request {when} running within {self.limit_ms:g} ms of its arrival{ahead} "
                "(--max-queue-wait-ms); retry shortly"
            )
        return GatewayTimeout(
            f"the request's own timeout ({self.limit_ms:g} ms from its arrival) {'would pass' if ahead else 'passed'} "
            f"before its rows could start{ahead}; nothing ran for it"
        )


def earliest(*deadlines: Deadline | None) -> Deadline | None:
    given = [deadline for deadline in deadlines if deadline is not None]
    return min(given, key=lambda deadline: deadline.at) if given else None


@dataclass(eq=False)
class Job:
    """One admitted request: its encoded rows, the point they run at, and the future its handler awaits."""

    rows: EncodedBatch
    point: OperatingPoint
    paired: bool
    future: asyncio.Future
    deadline: Deadline | None = None
    admitted: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def group(self) -> tuple[OperatingPoint, bool]:
        """Only jobs with the same point (and pairing) can share a runtime call."""
        return self.point, self.paired


class Batcher:
    def __init__(
        self,
        predict: PredictEncoded,
        pad_id: int,
        metrics: ServingMetrics,
        max_batch_size: int,
        max_wait_seconds: float,
        max_queue_rows: int,
    ):
        self.predict = predict
        self.pad_id = pad_id
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.max_queue_rows = max_queue_rows
        self.accepting = True
        self.queued_rows = 0
        self.row_seconds: float | None = None  # recent batches' run time per row
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcee-batch")
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work(), name="pcee-batcher")

    # -- admission ----------------------------------------------------------------------------------
    def check_room(self, rows: int) -> None:
        """Refuse before any work: while draining, past the queue bound, or a request larger than it."""
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry on another replica", close=True)
        if rows > self.max_queue_rows:
            raise PayloadTooLarge(
                f"the request has {rows} rows; this server takes at most {self.max_queue_rows} per request (--max-queue)"
            )
        if self.queued_rows + rows > self.max_queue_rows:
            raise Unavailable(
                f"overloaded: {self.queued_rows} rows are waiting (--max-queue {self.max_queue_rows}); retry shortly"
            )

    def check_deadline(self, deadline: Deadline | None) -> None:
        """Refuse (and count) a request whose deadline has passed, or will have before the rows queued
        ahead of it are done (at the rate recent batches ran): a fast 503/504 instead of a slow one."""
        if deadline is None:
            return
        now, ahead = time.monotonic(), self.queued_ahead_seconds()
        if deadline.passed(now + ahead):
            self.metrics.requests_dropped.labels(reason=deadline.reason).inc()
            raise deadline.expired_error(None if deadline.passed(now) else ahead)

    def queued_ahead_seconds(self) -> float:
        """How long the rows now queued would take to run, at the recent seconds per row (0 before any batch)."""
        return self.queued_rows * (self.row_seconds or 0.0)

    async def submit(
        self,
        rows: EncodedBatch,
        point: OperatingPoint,
        paired: bool,
        deadline: Deadline | None = None,
        departed: Callable[[], Awaitable[None]] | None = None,
    ) -> PredictionResult:
        """Queue the rows and wait for their result; a client that departs first takes its rows out of the queue.

        `departed()` returns an awaitable that completes when the client has gone away.
        """
        self.check_room(len(rows))
        self.check_deadline(deadline)
        job = Job(rows, point, paired, asyncio.get_running_loop().create_future(), deadline)
        self._enqueue(job)
        if departed is None:
            return await job.future
        watch = asyncio.ensure_future(departed())
        try:
            await asyncio.wait((job.future, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            watch.add_done_callback(
                lambda task: task.cancelled() or task.exception()
            )  # consumed, never "unretrieved"
        if not job.future.done():
            self._drop(job, CLIENT_DISCONNECTED, ClientClosedRequest("the client disconnected while queued"))
        return await job.future

    def _enqueue(self, job: Job) -> None:
        self._pending.append(job)
        self._idle.clear()
        self._set_queued(self.queued_rows + job.count)
        if job.deadline is not None:
            job.timer = self._loop.call_at(job.deadline.at, self._expire, job)
        self._arrived.set()

    def _expire(self, job: Job) -> None:
        self._drop(job, job.deadline.reason, job.deadline.expired_error())

    def _drop(self, job: Job, reason: str, error: ServingError) -> None:
        """Answer a job that will not run; only a queued one (a running batch finishes its rows)."""
        if job not in self._pending:
            return
        self._pending.remove(job)
        self._set_queued(self.queued_rows - job.count)
        self._settle(job, error)
        self.metrics.requests_dropped.labels(reason=reason).inc()
        self._note_if_idle()

    def oldest_wait_seconds(self) -> float:
        return time.monotonic() - self._pending[0].admitted if self._pending else 0.0

    def _set_queued(self, rows: int) -> None:
        self.queued_rows = rows
        self.metrics.queue_rows.set(rows)

    # -- drain and close ------------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """Refuse new rows and stop waiting for a batch to fill. Safe to call from a signal handler."""
        self.accepting = False
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._arrived.set)

    async def drain(self, within_seconds: float) -> None:
        """Stop admitting and answer what was admitted; whatever has not got its answer in time gets 503."""
        self.stop_accepting()
        self._arrived.set()
        try:
            await asyncio.wait_for(self._idle.wait(), within_seconds)
        except asyncio.TimeoutError:
            self._give_up_on_everything()

    def _give_up_on_everything(self) -> None:
        error = Unavailable(
            "the server is shutting down and could not run this request within --drain-timeout-s; retry on another replica",
            close=True,
        )
        for job in [*self._running, *self._pending]:
            if not job.future.done():
                self._settle(job, error)
                self.metrics.requests_dropped.labels(reason=SHUTDOWN).inc()
        self._pending.clear()
        self._set_queued(0)

    async def close(self) -> None:
        """Stop the worker (after `drain`, or answering what is queued) and its thread."""
        self.accepting = False
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    def _note_if_idle(self) -> None:
        if not self._pending and not self._running:
            self._idle.set()

    # -- the worker ---------------------------------------------------------------------------------
    async def _work(self) -> None:
        while await self._wait_for_rows():
            batch = await self._gather()
            if batch:
                await self._run(batch)

    async def _wait_for_rows(self) -> bool:
        """True once a job waits; False when closed with nothing left to answer."""
        while not self._pending:
            if not self.accepting:
                return False
            self._arrived.clear()
            await self._arrived.wait()
        return True

    async def _gather(self) -> list[Job]:
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
        return sum(job.count for job in self._pending if job.group == group)

    def _take(self, group) -> list[Job]:
        """The oldest jobs of `group` up to max_batch_size rows (at least one job, however large).

        A job whose deadline has passed is dropped here even if its timer has not fired yet.
        """
        now = time.monotonic()
        for job in [job for job in self._pending if job.deadline is not None and job.deadline.passed(now)]:
            self._expire(job)
        taken, rows, kept = [], 0, deque()
        for job in self._pending:
            fits = not taken or rows + job.count <= self.max_batch_size
            if job.group == group and fits:
                taken.append(job)
                rows += job.count
            else:
                kept.append(job)
        self._pending = kept
        self._set_queued(self.queued_rows - rows)
        return taken

    async def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        self._running = batch
        for job in batch:
            if job.timer is not None:
                job.timer.cancel()
            self.metrics.queue_wait_seconds.observe(started - job.admitted)
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                self.predict,
                join_rows([job.rows for job in batch], self.pad_id),
                batch[0].point,
            )
        except Exception as error:  # a backend failure: every job of the batch gets it (answered as 500)
            outcomes: list[PredictionResult | Exception] = [error] * len(batch)
        else:
            self.metrics.observe_batch(result)
            self._note_row_seconds((time.monotonic() - started) / len(result.predictions))
            outcomes = split_rows(result, [job.count for job in batch])
        self._running = []
        for job, outcome in zip(batch, outcomes):
            self._settle(job, outcome)
        self._note_if_idle()

    def _note_row_seconds(self, seconds: float) -> None:
        """A moving average over the last batches: what admission expects a queued row to cost."""
        previous = self.row_seconds
        self.row_seconds = (
            seconds if previous is None else previous + ROW_SECONDS_WEIGHT * (seconds - previous)
        )

    @staticmethod
    def _settle(job: Job, outcome: PredictionResult | Exception) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if job.future.done():
            return
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


def join_rows(parts: list[EncodedBatch], pad_id: int) -> EncodedBatch:
    """The rows of several encoded requests as one batch, padded to the longest (as one encode call pads)."""
    if len(parts) == 1:
        return parts[0]
    longest = max(part.input_ids.shape[1] for part in parts)

    def stacked(name: str, fill: int) -> np.ndarray:
        arrays = [getattr(part, name) for part in parts]
        return np.concatenate(
            [np.pad(array, ((0, 0), (0, longest - array.shape[1])), constant_values=fill) for array in arrays]
        )

    return EncodedBatch(
        stacked("input_ids", pad_id),
        stacked("attention_mask", 0),
        stacked("token_type_ids", 0),
        np.concatenate([part.truncated for part in parts]),
    )


def split_rows(result: PredictionResult, counts: list[int]) -> list[PredictionResult]:
    outcomes, start = [], 0
    for count in counts:
        rows = result.predictions[start : start + count]
        start += count
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
