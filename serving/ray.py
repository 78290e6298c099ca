"""Ray Serve scale-out: the bundle behind a Ray Serve deployment, one bundle load per replica.

    pcee-serve runs/sst2-pcee --ray --replicas 2            # a local Ray cluster on this machine
    RAY_ADDRESS=ray://head:10001 pcee-serve /shared/sst2-pcee --ray --replicas 8

Each replica answers `/v1/classify` and OIP v2 inference exactly as `pcee-serve` does (the same
parsing, checks, responses and error answers); `@serve.batch` gathers rows across the requests
a replica holds into one runtime call. Ray's proxy spreads requests over replicas and answers
503 once `--max-queue` requests wait for one. The adaptive controller, the shadow run, the admin
route and the Prometheus route are single-process features: Ray Serve exports its own metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pcee.runtime import EarlyExitRuntime, Manifest, OperatingPoint, PceeError, PolicyError, PredictionResult

from .app import error_answer, read_body, refuse_binary_tensors
from .batching import Outcome, predict_each
from .errors import NotFound, PayloadTooLarge
from .protocol import ClassifyRequest, classify_response, infer_response, parse_classify, parse_infer
from .service import warm_up
from .settings import ServerSettings

log = logging.getLogger("pcee.serving")

INFER_PREFIX, INFER_SUFFIX = "/v2/models/", "/infer"
# Single-row requests: `max_batch_size` of them fill a batch; twice that lets the next batch gather while one runs.
ONGOING_REQUESTS_PER_BATCH = 2
CONSTRUCTOR_RETRIES = (
    3  # a transient node problem is retried; a broken bundle fails the deploy in seconds, not minutes
)


@dataclass(frozen=True)
class ReplicaOptions:
    """How the bundle is loaded in each replica and what each replica is given."""

    bundle_dir: (
        str  # absolute: replicas run in other directories, or on other nodes with the same shared path
    )
    backend: str = "auto"
    intra_op_threads: int | None = None
    replicas: int = 1
    replica_cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.replica_cpus < 0:
            raise ValueError(f"replica_cpus must be >= 0, got {self.replica_cpus}")

    @property
    def threads(self) -> int:
        """onnxruntime threads per session: as asked, else one per CPU the replica reserves (so replicas never oversubscribe)."""
        return self.intra_op_threads or max(1, int(self.replica_cpus))


@serve.deployment
class EarlyExitDeployment:
    """One replica: one runtime, with the serving room's parsing, batching split and error answers."""

    def __init__(self, settings: ServerSettings, options: ReplicaOptions):
        self.settings = settings
        self.runtime = EarlyExitRuntime.from_bundle(
            options.bundle_dir, backend=options.backend, intra_op_threads=options.threads
        )
        if settings.operating_point is not None:
            self.runtime.set_operating_point(settings.operating_point)
        warm_up(self.runtime, settings.max_batch_size)
        self.predict_batch.set_max_batch_size(settings.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(settings.max_wait_seconds)

    async def __call__(self, request: Request) -> Response:
        try:
            return await self.route(request)
        except Exception as error:
            if not isinstance(error, (PceeError, HTTPException)):
                log.exception("unexpected error on %s", request.url.path)
            return error_answer(error, request)

    async def route(self, request: Request) -> Response:
        path = request.url.path
        if path in ("/v2/health/live", "/v2/health/ready"):
            return JSONResponse(
                {path.rsplit("/", 1)[1]: True}
            )  # a replica takes requests only once loaded and warm
        if path == "/v1/classify":
            require_post(request)
            parsed = parse_classify(await read_body(request, self.settings), self.runtime.takes_pairs)
            return JSONResponse(classify_response(await self.classify(parsed)))
        if path.startswith(INFER_PREFIX) and path.endswith(INFER_SUFFIX):
            require_post(request)
            self.check_model_name(path[len(INFER_PREFIX) : -len(INFER_SUFFIX)])
            refuse_binary_tensors(request)
            parsed = parse_infer(await read_body(request, self.settings), self.runtime.takes_pairs)
            return JSONResponse(
                infer_response(self.settings.model_name, parsed, await self.classify(parsed.rows))
            )
        raise NotFound(
            f"no route {path}; this Ray deployment serves /v1/classify, {INFER_PREFIX}{{name}}{INFER_SUFFIX} and /v2/health/*"
        )

    def check_model_name(self, name: str) -> None:
        if name != self.settings.model_name:
            raise NotFound(f"no model named {name!r}; this deployment serves {self.settings.model_name!r}")

    async def classify(self, request: ClassifyRequest) -> PredictionResult:
        if request.rows > self.settings.max_queue:
            raise PayloadTooLarge(
                f"the request has {request.rows} rows; this deployment takes at most {self.settings.max_queue} per request (--max-queue)"
            )
        point = (
            self.runtime.operating_point
            if request.point_name is None
            else self.runtime.resolve_operating_point(request.point_name)
        )
        if request.rows > self.settings.max_batch_size:  # it fills batches of its own
            outcome = (await asyncio.to_thread(self.predict_group, [(request, point)]))[0]
        else:
            outcome = await self.predict_batch((request, point))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @serve.batch(batch_size_fn=lambda jobs: sum(request.rows for request, _ in jobs))
    async def predict_batch(self, jobs: list[tuple[ClassifyRequest, OperatingPoint]]) -> list[Outcome]:
        """The rows of every request the replica holds, one runtime call per (point, pairing) group, off the event loop."""
        outcomes: dict[int, Outcome] = {}
        for indices in groups(jobs).values():
            group_outcomes = await asyncio.to_thread(self.predict_group, [jobs[index] for index in indices])
            outcomes.update(zip(indices, group_outcomes))
        return [outcomes[index] for index in range(len(jobs))]

    def predict_group(self, jobs: list[tuple[ClassifyRequest, OperatingPoint]]) -> list[Outcome]:
        """Requests of one (point, pairing) group; a backend failure becomes every request's outcome (a 500)."""
        requests, point = [request for request, _ in jobs], jobs[0][1]
        try:
            return predict_each(self.predict, requests, point, observe=lambda result: None)
        except Exception as error:
            return [error] * len(jobs)

    def predict(self, texts: list[str], pairs: list[str] | None, point: OperatingPoint) -> PredictionResult:
        return self.runtime.predict(
            texts, pairs, operating_point=point, batch_size=self.settings.max_batch_size
        )


def require_post(request: Request) -> None:
    if request.method != "POST":
        raise HTTPException(405, f"use POST, not {request.method}")


def groups(
    jobs: list[tuple[ClassifyRequest, OperatingPoint]],
) -> dict[tuple[OperatingPoint, bool], list[int]]:
    """Job indices by what lets them share a runtime call: the same point and the same pairing."""
    grouped: dict[tuple[OperatingPoint, bool], list[int]] = {}
    for index, (request, point) in enumerate(jobs):
        grouped.setdefault((point, request.text_pairs is not None), []).append(index)
    return grouped


def application(settings: ServerSettings, options: ReplicaOptions) -> Application:
    """The bound Ray Serve application: `serve.run(application(...))` deploys it on the connected cluster."""
    return EarlyExitDeployment.options(
        name=settings.model_name,
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        max_ongoing_requests=ONGOING_REQUESTS_PER_BATCH * settings.max_batch_size,
        max_queued_requests=settings.max_queue,
        backpressure_config={"retry_after_s": 1},  # 503 with Retry-After: 1, as pcee-serve answers
        max_constructor_retry_count=CONSTRUCTOR_RETRIES,
    ).bind(settings, options)


def check_bundle(settings: ServerSettings, options: ReplicaOptions) -> None:
    """Fail here, in one line, rather than in every replica's constructor (which Ray retries, and logs far away)."""
    manifest = Manifest.load(options.bundle_dir)
    if settings.operating_point is not None and manifest.saved_point(settings.operating_point) is None:
        names = [point.name for point in manifest.operating_points]
        raise PolicyError(
            f"no operating point named {settings.operating_point!r} in the manifest; saved points: {names}"
        )


def connect(settings: ServerSettings, options: ReplicaOptions) -> None:
    """Check the bundle, then join the cluster RAY_ADDRESS names, or start a local one."""
    check_bundle(settings, options)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, **local_cluster_options())


def deploy(settings: ServerSettings, options: ReplicaOptions, host: str, port: int) -> DeploymentHandle:
    """Serve's HTTP proxy on host:port and the application behind it, once every replica is ready (after `connect`).

    A replica that cannot start makes `serve.run` raise RuntimeError (after Ray's constructor retries).
    """
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(settings, options), name=settings.model_name, route_prefix="/")


def local_cluster_options() -> dict:
    """A cluster this process starts itself gets node address 127.0.0.1; RAY_ADDRESS names one to join instead."""
    return {} if os.environ.get("RAY_ADDRESS") else {"_node_ip_address": "127.0.0.1"}


def serve_until_signalled(settings: ServerSettings, options: ReplicaOptions, host: str, port: int) -> None:
    """Deploy, serve until SIGTERM or SIGINT, then delete the application (a local cluster goes with it)."""
    stop = threading.Event()
    try:
        connect(settings, options)
        for handled in (
            signal.SIGTERM,
            signal.SIGINT,
        ):  # after ray.init, which installs its own (sys.exit on SIGTERM)
            signal.signal(handled, lambda *_: stop.set())
        deploy(settings, options, host, port)
        log.info(
            "pcee-serve on Ray Serve: %d replica(s) of %s at http://%s:%d",
            options.replicas,
            settings.model_name,
            host,
            port,
        )
        stop.wait()
    finally:
        if ray.is_initialized():
            serve.delete(settings.model_name)
            ray.shutdown()
