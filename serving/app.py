"""The ASGI app: OIP v2 and plain JSON routes, metrics, admin, over one `InferenceService`.

Every answer is JSON (errors as `{"error": "..."}`) except `/metrics`; nothing drops a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcee.runtime import InputError, PceeError, PolicyError

from .batching import REQUEST_TIMEOUT, Deadline
from .connections import ARRIVED_AT
from .errors import BadRequest, ClientClosedRequest, NotFound, PayloadTooLarge, RequestTimeout, ServingError
from .metrics import ServingMetrics
from .protocol import (
    MODEL_VERSION,
    classify_response,
    infer_response,
    model_config,
    model_metadata,
    parse_classify,
    parse_infer,
    parse_json,
    server_metadata,
)
from .service import InferenceService, RuntimeLoader
from .settings import ServerSettings

log = logging.getLogger("pcee.serving")
access_log = logging.getLogger("pcee.serving.access")

try:
    PCEE_VERSION = package_version("pcee")
except PackageNotFoundError:  # run from a source tree that was never installed
    PCEE_VERSION = "unknown"

BINARY_EXTENSION_HEADER = "inference-header-content-length"


def create_app(
    settings: ServerSettings,
    load_runtime: RuntimeLoader,
    on_startup_failure: Callable[[BaseException], None] | None = None,
    ready_before_serving: bool = False,
    echo_request_id: bool = True,
) -> Starlette:
    """An app that loads its runtime at startup (in a thread) and closes it at shutdown.

    `app.state.service` is the `InferenceService`: `drain()` on it is what SIGTERM runs.
    `ready_before_serving`: the lifespan startup returns only once the bundle is loaded and warm
    (and raises if it failed), for hosts that route to an app as soon as its startup returns (Ray Serve).
    `echo_request_id`: answer with X-Request-ID (off where a proxy in front already does, as Ray's does).
    """
    service = InferenceService(settings, load_runtime, on_startup_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.begin_startup()
        if ready_before_serving:
            await service.started()
        yield
        await service.close()

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestLog, metrics=service.metrics, echo_request_id=echo_request_id)],
        exception_handlers={
            kind: answer_error
            for kind in (ServingError, InputError, PolicyError, PceeError, HTTPException, Exception)
        },
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def service_of(request: Request) -> InferenceService:
    return request.app.state.service


# -- request bodies --------------------------------------------------------------------------------
async def read_body(request: Request, settings: ServerSettings) -> bytes:
    """The whole body, refused past --max-body-bytes (413) or when it does not arrive within --body-timeout-s (408)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise PayloadTooLarge(
            f"the body is {declared} bytes; this server takes at most {settings.max_body_bytes} (--max-body-bytes)"
        )
    try:
        return await asyncio.wait_for(read_limited(request, settings.max_body_bytes), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {settings.body_timeout_s:g} s (--body-timeout-s)"
        ) from None
    except ClientDisconnect:
        raise ClientClosedRequest("the client disconnected before sending the whole body") from None


async def read_limited(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the body is over {limit} bytes, the most this server takes (--max-body-bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def refuse_binary_tensors(request: Request, body: bytes) -> None:
    """Triton's binary extension: its header gives the JSON part's length. Equal to the body (what
    Triton's C++ clients send with JSON tensors): all JSON, fine; shorter: binary tensors follow, refused."""
    declared = request.headers.get(BINARY_EXTENSION_HEADER)
    if declared is not None and declared.strip() != str(len(body)):
        raise BadRequest(
            "the binary tensor data extension is not supported; send tensor data as JSON "
            "(tritonclient: binary_data=False; perf_analyzer: --input-tensor-format json --output-tensor-format json)"
        )


# -- deadlines and departures ----------------------------------------------------------------------
TIMEOUT_HEADER = "x-request-timeout-ms"


def arrival(request: Request) -> float:
    """When the request's first bytes arrived (`time.monotonic()`): what every deadline counts from."""
    return request.scope[ARRIVED_AT]


def request_timeout(request: Request, timeout_ms: float | None = None) -> Deadline | None:
    """The request's own deadline, from its arrival: the X-Request-Timeout-Ms header, or OIP's `timeout`
    parameter (the shorter)."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        given = header_milliseconds(header)
        timeout_ms = given if timeout_ms is None or given is None else min(timeout_ms, given)
    if timeout_ms is None:
        return None
    return Deadline(arrival(request) + timeout_ms / 1000.0, REQUEST_TIMEOUT, timeout_ms)


def header_milliseconds(header: str) -> float | None:
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"X-Request-Timeout-Ms must be a number of milliseconds >= 0, got {header[:40]!r}")
    return value or None


async def client_departed(request: Request) -> None:
    """Returns when the client has closed its connection (the body has been read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- routes ----------------------------------------------------------------------------------------
async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    service = service_of(request)
    if service.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "reason": service.not_ready_reason()}, status_code=503)


async def server_info(request: Request) -> Response:
    return JSONResponse(server_metadata(PCEE_VERSION))


def checked_model(request: Request) -> InferenceService:
    """The service, once the path's model name (and version, where given) are the served model's."""
    service = service_of(request)
    service.check_model_name(request.path_params["name"])
    version = request.path_params.get("version")
    if version is not None and version != MODEL_VERSION:
        raise NotFound(
            f"model {service.settings.model_name!r} has version {MODEL_VERSION!r} only, not {version!r}"
        )
    return service


async def model_info(request: Request) -> Response:
    service = checked_model(request)
    runtime = service.serving_runtime()
    return JSONResponse(model_metadata(service.settings.model_name, runtime.takes_pairs, len(runtime.labels)))


async def model_config_info(request: Request) -> Response:
    service = checked_model(request)
    runtime = service.serving_runtime()
    return JSONResponse(
        model_config(
            service.settings.model_name,
            runtime.takes_pairs,
            len(runtime.labels),
            service.settings.max_queue_wait_ms,
        )
    )


async def model_ready(request: Request) -> Response:
    service = checked_model(request)
    return JSONResponse(
        {"name": service.settings.model_name, "ready": service.ready},
        status_code=200 if service.ready else 503,
    )


async def infer(request: Request) -> Response:
    service = checked_model(request)
    runtime = service.serving_runtime()
    body = await read_body(request, service.settings)
    refuse_binary_tensors(request, body)
    parsed = parse_infer(body, runtime.takes_pairs)
    timeout = request_timeout(request, parsed.timeout_ms)
    result = await service.classify(
        parsed.rows, arrival(request), timeout, functools.partial(client_departed, request)
    )
    return JSONResponse(infer_response(service.settings.model_name, parsed, result))


async def classify(request: Request) -> Response:
    service = service_of(request)
    runtime = service.serving_runtime()
    parsed = parse_classify(await read_body(request, service.settings), runtime.takes_pairs)
    result = await service.classify(
        parsed, arrival(request), request_timeout(request), functools.partial(client_departed, request)
    )
    return JSONResponse(classify_response(result))


async def set_operating_point(request: Request) -> Response:
    """`{"operating_point": "saved-name"}` or `{"operating_point": {"policy": ..., "tau": ..., ...}}`."""
    service = service_of(request)
    service.check_admin(request.headers.get("authorization"))
    body = parse_json(await read_body(request, service.settings))
    if not isinstance(body, dict) or set(body) != {"operating_point"}:
        raise BadRequest(
            'send {"operating_point": "<saved name>"} or {"operating_point": {"policy": ..., "tau": ..., "patience": ...}}'
        )
    chosen = service.switch_point(body["operating_point"], source="admin")
    return JSONResponse({"operating_point": chosen.to_dict()})


async def metrics(request: Request) -> Response:
    registry = service_of(request).metrics
    return Response(registry.exposition(), media_type=ServingMetrics.CONTENT_TYPE)


def model_routes(prefix: str) -> list[Route]:
    """OIP's per-model routes, under /v2/models/{name} and again under .../versions/{version}."""
    return [
        Route(prefix, model_info),
        Route(prefix + "/ready", model_ready),
        Route(prefix + "/config", model_config_info),
        Route(prefix + "/infer", infer, methods=["POST"]),
    ]


ROUTES = [
    Route("/v2", server_info),
    Route("/v2/health/live", live),
    Route("/v2/health/ready", ready),
    *model_routes("/v2/models/{name}"),
    *model_routes("/v2/models/{name}/versions/{version}"),
    Route("/v1/classify", classify, methods=["POST"]),
    Route("/v1/operating-point", set_operating_point, methods=["PUT"]),
    Route("/metrics", metrics),
]


# -- errors ----------------------------------------------------------------------------------------
class ErrorResponse(JSONResponse):
    """`{"error": message}`, ASCII-escaped: a message quoting a client's broken string still encodes."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorResponse({"error": message}, status_code=status, headers=headers)


def error_answer(error: Exception, request: Request) -> JSONResponse:
    """The JSON answer to an error raised while handling `request`."""
    if isinstance(error, ServingError):
        return error_response(str(error), error.status, error.headers())
    if isinstance(error, (InputError, PolicyError)):
        return error_response(str(error), 400)
    if isinstance(error, PceeError):
        log.error("%s on %s: %s", type(error).__name__, request.url.path, error)
        return error_response(f"{type(error).__name__}: {error}", 500)
    if isinstance(error, HTTPException):
        return error_response(
            f"{request.method} {request.url.path}: {error.detail}", error.status_code, error.headers
        )
    return error_response("internal server error; the server log has the details", 500)


async def answer_error(request: Request, error: Exception) -> Response:
    return error_answer(error, request)


# -- every request: its id, its metrics, its access-log line -----------------------------------------
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-ID when it is printable ASCII of sane length, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID_CHARS and all(0x21 <= byte <= 0x7E for byte in value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestLog:
    """ASGI middleware: echoes X-Request-ID (made when absent), counts and times every answer by route
    and status (404s and 500s too), and writes one access-log line per request when that log is on.

    Times count from the request's arrival (`ARRIVED_AT`, set by pcee-serve's connection layer; under
    another ASGI server, from when the request reaches this middleware).
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, echo_request_id: bool = True):
        self.app = app
        self.metrics = metrics
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived, status = scope.setdefault(ARRIVED_AT, time.monotonic()), 500
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.echo_request_id:
                    message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - arrived
            self.metrics.observe_request(route_label(scope), status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %d %.1f ms request_id=%s",
                    scope["method"],
                    scope["path"],
                    status,
                    seconds * 1000,
                    request_id,
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(seconds * 1000, 3),
                        "client": client_address(scope),
                    },
                )


def client_address(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def route_label(scope: Scope) -> str:
    """The matched route's handler name: one label value per route, never the raw path."""
    endpoint = scope.get("endpoint")
    return getattr(endpoint, "__name__", "unmatched")
