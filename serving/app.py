"""The ASGI app: OIP v2 and plain JSON routes, metrics, admin, over one `InferenceService`.

Every answer is JSON (errors as `{"error": "..."}`) except `/metrics`; nothing drops a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcee.runtime import InputError, PceeError, PolicyError

from .errors import BadRequest, ClientClosedRequest, PayloadTooLarge, RequestTimeout, ServingError
from .metrics import ServingMetrics
from .protocol import (
    classify_response,
    infer_response,
    model_metadata,
    parse_classify,
    parse_infer,
    parse_json,
)
from .service import InferenceService, RuntimeLoader
from .settings import ServerSettings

log = logging.getLogger("pcee.serving")

BINARY_EXTENSION_HEADER = "inference-header-content-length"


def create_app(
    settings: ServerSettings,
    load_runtime: RuntimeLoader,
    on_startup_failure: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """An app that loads its runtime at startup (in a thread) and closes it at shutdown.

    `app.state.service` is the `InferenceService`; `begin_draining()` on it is what SIGTERM calls.
    """
    service = InferenceService(settings, load_runtime, on_startup_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.begin_startup()
        yield
        await service.close()

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestMetrics, metrics=service.metrics)],
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


def refuse_binary_tensors(request: Request) -> None:
    if BINARY_EXTENSION_HEADER in request.headers:
        raise BadRequest(
            "the binary tensor data extension is not supported; send tensor data as JSON (tritonclient: binary_data=False)"
        )


# -- routes ----------------------------------------------------------------------------------------
async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    service = service_of(request)
    if service.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "reason": service.not_ready_reason()}, status_code=503)


async def model_info(request: Request) -> Response:
    service = service_of(request)
    service.check_model_name(request.path_params["name"])
    runtime = service.serving_runtime()
    return JSONResponse(model_metadata(service.settings.model_name, runtime.takes_pairs, len(runtime.labels)))


async def model_ready(request: Request) -> Response:
    service = service_of(request)
    service.check_model_name(request.path_params["name"])
    return JSONResponse(
        {"name": service.settings.model_name, "ready": service.ready},
        status_code=200 if service.ready else 503,
    )


async def infer(request: Request) -> Response:
    service = service_of(request)
    service.check_model_name(request.path_params["name"])
    runtime = service.serving_runtime()
    refuse_binary_tensors(request)
    parsed = parse_infer(await read_body(request, service.settings), runtime.takes_pairs)
    result = await service.classify(parsed.rows)
    return JSONResponse(infer_response(service.settings.model_name, parsed, result))


async def classify(request: Request) -> Response:
    service = service_of(request)
    runtime = service.serving_runtime()
    parsed = parse_classify(await read_body(request, service.settings), runtime.takes_pairs)
    return JSONResponse(classify_response(await service.classify(parsed)))


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


ROUTES = [
    Route("/v2/health/live", live),
    Route("/v2/health/ready", ready),
    Route("/v2/models/{name}", model_info),
    Route("/v2/models/{name}/ready", model_ready),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v1/classify", classify, methods=["POST"]),
    Route("/v1/operating-point", set_operating_point, methods=["PUT"]),
    Route("/metrics", metrics),
]


# -- errors ----------------------------------------------------------------------------------------
def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_answer(error: Exception, request: Request) -> JSONResponse:
    """The JSON answer to an error raised while handling `request` (the Ray deployment answers the same way)."""
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


class RequestMetrics:
    """Counts every answer by route and status, and times it (ASGI middleware, so 404s and 500s count too)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.observe_request(route_label(scope), status, time.perf_counter() - started)


def route_label(scope: Scope) -> str:
    """The matched route's handler name: one label value per route, never the raw path."""
    endpoint = scope.get("endpoint")
    return getattr(endpoint, "__name__", "unmatched")
