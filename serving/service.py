"""The server's life: load the bundle and warm it up off the event loop, serve, drain, close.

HTTP-free: the app translates requests into calls on one `InferenceService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from pcee.runtime import FULL_POLICY, EarlyExitRuntime, EncodedBatch, OperatingPoint, PredictionResult

from .batching import QUEUE_WAIT, Batcher, Deadline, earliest
from .controller import AdaptiveController, check_ladder_order
from .errors import Conflict, NotFound, Unauthorized, Unavailable
from .metrics import ServingMetrics
from .protocol import ClassifyRequest, point_label
from .settings import ServerSettings
from .shadow import ShadowWatch

log = logging.getLogger("pcee.serving")

WARM_UP_TEXT = "warm-up"
FULL_MODEL = OperatingPoint(FULL_POLICY)
RuntimeLoader = Callable[[], EarlyExitRuntime]


def warm_up(runtime: EarlyExitRuntime, rows: int) -> None:
    """One full batch before the first request, so nobody's request pays for first-call allocations."""
    texts = [WARM_UP_TEXT] * rows
    runtime.predict(texts, texts if runtime.takes_pairs else None)


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class InferenceService:
    def __init__(
        self,
        settings: ServerSettings,
        load_runtime: RuntimeLoader,
        on_startup_failure: Callable[[BaseException], None] | None = None,
    ):
        self.settings = settings
        self.load_runtime = load_runtime
        self.on_startup_failure = on_startup_failure
        self.metrics = ServingMetrics(settings.max_batch_size)
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.runtime: EarlyExitRuntime | None = None
        self.batcher: Batcher | None = None
        self.controller: AdaptiveController | None = None
        self.shadow: ShadowWatch | None = None
        self._startup: asyncio.Task | None = None
        self._background: list[asyncio.Task] = []
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcee-tokenize")
        self.metrics.ready.set_function(
            lambda: float(self.ready)
        )  # read at scrape time: no writes from a signal handler

    # -- life cycle -------------------------------------------------------------------------------
    def begin_startup(self) -> None:
        """Load in the background, so /v2/health/live answers while the bundle loads."""
        self._startup = asyncio.get_running_loop().create_task(self._start(), name="pcee-startup")

    async def started(self) -> None:
        """Wait for the load and warm-up; raise if they failed (a host that must not route to a loading app)."""
        await self._startup
        if self.phase is Phase.FAILED:
            raise Unavailable(self.not_ready_reason())

    async def _start(self) -> None:
        try:
            self.runtime = await asyncio.to_thread(self._load_and_warm_up)
        except Exception as error:
            self.phase, self.failure = Phase.FAILED, f"{type(error).__name__}: {error}"
            log.error("pcee-serve could not start: %s", self.failure)
            if self.on_startup_failure is not None:
                self.on_startup_failure(error)
            return
        self._start_workers()
        self.metrics.show_point(self.runtime.operating_point)
        if self.phase is Phase.LOADING:  # a SIGTERM during the load keeps it draining
            self.phase = Phase.READY
            log.info(
                "pcee-serve ready: model %s, operating point %s",
                self.settings.model_name,
                point_label(self.runtime.operating_point),
            )

    def _start_workers(self) -> None:
        settings, loop = self.settings, asyncio.get_running_loop()
        self.batcher = Batcher(
            self._predict,
            self.runtime.tokenizer.pad_id,
            self.metrics,
            settings.max_batch_size,
            settings.max_wait_seconds,
            settings.max_queue,
        )
        self.batcher.start()
        if settings.controller is not None:
            switch = functools.partial(self.switch_point, source="controller")
            self.controller = AdaptiveController(
                settings.controller, switch, self.batcher.oldest_wait_seconds, self.metrics
            )
            self._background.append(loop.create_task(self.controller.run(), name="pcee-controller"))
        if settings.shadow_fraction > 0:
            self.shadow = ShadowWatch(
                settings.shadow_fraction, self._full_model_labels, self.metrics, settings.max_batch_size
            )
            self._background.append(loop.create_task(self.shadow.run(), name="pcee-shadow"))

    def _load_and_warm_up(self) -> EarlyExitRuntime:
        runtime = self.load_runtime()
        try:
            if self.settings.controller is not None:
                for name in self.settings.controller.points:
                    runtime.make_policy(
                        name
                    )  # an unknown or unservable point fails the start, not a later step
                check_ladder_order(runtime, self.settings.controller.points)
            if self.settings.starting_point is not None:
                runtime.set_operating_point(self.settings.starting_point)
            warm_up(runtime, self.settings.max_batch_size)
        except BaseException:
            runtime.close()
            raise
        return runtime

    def _predict(self, rows: EncodedBatch, point: OperatingPoint) -> PredictionResult:
        return self.runtime.predict_encoded(rows, point, batch_size=self.settings.max_batch_size)

    def _full_model_labels(self, texts: list[str], pairs: list[str] | None) -> list[int]:
        result = self.runtime.predict(
            texts, pairs, operating_point=FULL_MODEL, batch_size=self.settings.max_batch_size
        )
        return [row.label_index for row in result.predictions]

    def begin_draining(self) -> None:
        """Readiness off and new rows refused at once; admitted rows are still answered. Signal-handler safe."""
        if self.phase is not Phase.FAILED:
            self.phase = Phase.DRAINING
        if self.batcher is not None:
            self.batcher.stop_accepting()

    async def drain(self) -> None:
        """Readiness off, new requests refused; the admitted ones answered within the drain time, or given 503."""
        self.begin_draining()
        if self.batcher is not None:
            await self.batcher.drain(self.settings.drain_seconds)

    async def close(self) -> None:
        self.begin_draining()
        if self._startup is not None:
            await self._startup
        if self.batcher is not None:
            await self.batcher.close()
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.shadow is not None:
            await asyncio.to_thread(self.shadow.close)
        self._tokenizer_thread.shutdown(wait=True)
        if self.runtime is not None:
            self.runtime.close()

    # -- requests ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def not_ready_reason(self) -> str:
        if self.phase is Phase.FAILED:
            return f"the model failed to load: {self.failure}"
        return {Phase.LOADING: "the model is loading", Phase.DRAINING: "the server is shutting down"}.get(
            self.phase, ""
        )

    def serving_runtime(self) -> EarlyExitRuntime:
        if not self.ready:
            raise Unavailable(self.not_ready_reason(), retry_after_seconds=5)
        return self.runtime

    def check_model_name(self, name: str) -> None:
        if name != self.settings.model_name:
            raise NotFound(f"no model named {name!r}; this server serves {self.settings.model_name!r}")

    async def classify(
        self,
        request: ClassifyRequest,
        arrived_at: float | None = None,
        timeout: Deadline | None = None,
        departed: Callable[[], Awaitable[None]] | None = None,
    ) -> PredictionResult:
        """Admit (point resolved, texts validated and tokenized, room checked), queue, and wait for the rows.

        `arrived_at`: when the request arrived (`time.monotonic()`; default now), which the queue
        deadline counts from, so time spent before admission counts against it too; `timeout`: the
        request's own deadline; `departed()`: completes when the client goes away.
        """
        arrived_at = time.monotonic() if arrived_at is None else arrived_at
        runtime = self.serving_runtime()
        point = (
            runtime.operating_point
            if request.point_name is None
            else runtime.make_policy(request.point_name).point
        )
        self.batcher.check_room(request.rows)
        deadline = earliest(self._queue_deadline(arrived_at), timeout)
        self.batcher.check_deadline(deadline)  # a request that waited too long to be read is not tokenized
        rows = await self._encode(runtime, request)
        result = await self.batcher.submit(rows, point, request.text_pairs is not None, deadline, departed)
        if self.controller is not None and request.point_name is None:  # it judges the live point only
            self.controller.observe(time.monotonic() - arrived_at)
        if self.shadow is not None:
            self.shadow.offer(request, [row.label_index for row in result.predictions])
        return result

    def _queue_deadline(self, arrived_at: float) -> Deadline | None:
        limit_ms = self.settings.max_queue_wait_ms
        if not limit_ms:
            return None
        return Deadline(arrived_at + limit_ms / 1000.0, QUEUE_WAIT, limit_ms)

    async def _encode(self, runtime: EarlyExitRuntime, request: ClassifyRequest) -> EncodedBatch:
        """The request's rows validated and tokenized, once, before they may share a batch (a bad text is a 400 here).

        Always in the tokenizer's thread, even for one short text: the tokenizer lets go of the GIL,
        and on the event loop each call then waits to get it back from the batch thread (up to
        Python's switch interval), which under load starved the loop of reading requests at all.
        """
        encode = functools.partial(runtime.tokenizer.encode_texts, request.texts, request.text_pairs)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, encode)

    # -- admin ------------------------------------------------------------------------------------
    def check_admin(self, authorization: str | None) -> None:
        """404 when no token is configured (the endpoint is off), 401 unless the bearer token matches."""
        token = self.settings.admin_token
        if token is None:
            raise NotFound("the admin endpoint is off; set PCEE_ADMIN_TOKEN to turn it on")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("send the admin token as 'Authorization: Bearer <PCEE_ADMIN_TOKEN>'")
        if self.settings.controller is not None:
            raise Conflict(
                "the adaptive controller owns the operating point (--adaptive-points); restart without it to switch by hand"
            )

    def switch_point(self, point: str | dict, source: str) -> OperatingPoint:
        if self.runtime is None:
            raise Unavailable(self.not_ready_reason(), retry_after_seconds=5)
        chosen = self.runtime.set_operating_point(point)
        self.metrics.show_point(chosen)
        self.metrics.point_switches.labels(source=source).inc()
        log.info("operating point switched to %s by %s", point_label(chosen), source)
        return chosen
