"""`pcee-serve BUNDLE_DIR`: the bundle behind an HTTP server (OIP v2 + /v1/classify), on uvicorn."""

from __future__ import annotations

import asyncio
import functools
import logging
import logging.config
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click
import uvicorn
from click.core import ParameterSource

from pcee.runtime import BACKEND_NAMES, EarlyExitRuntime, PceeError

from .app import create_app
from .connections import ConnectionLimits, uvicorn_options
from .controller import ControllerSettings
from .logs import LOG_FORMATS, logging_config
from .service import InferenceService
from .settings import DEFAULT_MAX_BODY_BYTES, ServerSettings

log = logging.getLogger("pcee.serving")

ADMIN_TOKEN_VARIABLE = "PCEE_ADMIN_TOKEN"
STARTUP_FAILED = 1


class DrainingServer(uvicorn.Server):
    """uvicorn, plus a drain on the first SIGTERM/SIGINT: the server keeps listening, answers new
    requests 503 (readiness too), answers the admitted ones, then shuts uvicorn down; all within
    --drain-timeout-s. A second signal is uvicorn's own: stop now.
    """

    def __init__(self, config: uvicorn.Config, service: InferenceService):
        super().__init__(config)
        self.service = service
        self.exit_code = 0
        self.draining: asyncio.Task | None = None
        service.on_startup_failure = self.fail_startup

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.begin_draining()
        if self.draining is not None or self.should_exit or not self.started:
            super().handle_exit(sig, frame)
            return
        # a signal handler interrupts the loop's own code: only hand the loop a callback, thread-safely
        asyncio.get_event_loop().call_soon_threadsafe(self.start_draining)

    def start_draining(self) -> None:
        if self.draining is None:
            log.info(
                "draining: answering admitted requests within %g s", self.service.settings.drain_timeout_s
            )
            self.draining = asyncio.get_running_loop().create_task(self.drain(), name="pcee-drain")

    async def drain(self) -> None:
        try:
            await self.service.drain()
        finally:
            self.should_exit = True

    def fail_startup(self, error: BaseException) -> None:
        self.exit_code = STARTUP_FAILED
        self.should_exit = True


def controller_settings(
    slo_p99_ms: float | None,
    adaptive_points: str | None,
    dwell_s: float,
    window_s: float,
    operating_point: str | None,
) -> ControllerSettings | None:
    if slo_p99_ms is None and adaptive_points is None:
        return None
    if slo_p99_ms is None or adaptive_points is None:
        raise click.UsageError("the adaptive controller needs both --slo-p99-ms and --adaptive-points")
    if operating_point is not None:
        raise click.UsageError(
            "give --operating-point or --adaptive-points, not both: the controller starts at the first adaptive point"
        )
    points = tuple(name.strip() for name in adaptive_points.split(",") if name.strip())
    try:
        return ControllerSettings(slo_p99_ms, points, dwell_s=dwell_s, window_s=window_s)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--adaptive-points") from None


def serve_on_ray(
    bundle_dir: Path,
    settings: ServerSettings,
    backend: str,
    intra_op_threads: int | None,
    replicas: int,
    replica_cpus: float,
    host: str,
    port: int,
) -> None:
    if settings.controller is not None:
        raise click.UsageError(
            "--slo-p99-ms and --adaptive-points are single-process features; drop them with --ray"
        )
    try:
        from .ray import ReplicaOptions, serve_until_signalled
    except ImportError as error:
        raise click.ClickException(
            f"--ray needs Ray Serve ({error}); install it with: pip install 'pcee[ray]'"
        ) from None
    options = ReplicaOptions(str(bundle_dir.resolve()), backend, intra_op_threads, replicas, replica_cpus)
    try:
        serve_until_signalled(settings, options, host, port)
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    except RuntimeError as error:  # serve.run's; the replica's own error is in Ray's log lines above
        raise click.ClickException(f"{error} (the replicas' errors are in the log above)") from None


def server_config(
    app,
    settings: ServerSettings,
    limits: ConnectionLimits,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    log_format: str = "text",
    access_log: bool = False,
) -> uvicorn.Config:
    """uvicorn as pcee-serve runs it: the guarded HTTP protocol, the server's log format, the drain's exit margin."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        **uvicorn_options(limits),
        log_config=logging_config(log_level, log_format, access_log),
        access_log=False,
        lifespan="on",
        # what is left of --drain-timeout-s once the drain has answered everything: time to write the answers
        timeout_graceful_shutdown=max(0.1, settings.drain_timeout_s - settings.drain_seconds),
    )


def refuse_ray_only_options(*names: str) -> None:
    context = click.get_current_context()
    given = [name for name in names if context.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(
            f"{', '.join('--' + name.replace('_', '-') for name in given)} only apply with --ray"
        )


option = functools.partial(click.option, show_envvar=True)


@click.command(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "show_default": True,
        "auto_envvar_prefix": "PCEE",
        "max_content_width": 100,
    }
)
@click.argument(
    "bundle_dir", envvar="PCEE_BUNDLE_DIR", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@option(
    "--host",
    default="127.0.0.1",
    help="Address to listen on; 0.0.0.0 for every interface (e.g. in a container).",
)
@option("--port", default=8000, type=click.IntRange(0, 65535), help="TCP port to listen on.")
@option("--model-name", help="The name in /v2/models/{name}; default: the bundle directory's name.")
@option(
    "--operating-point",
    help="Start at this operating point saved in the manifest (default: the manifest's own).",
)
@option(
    "--backend",
    default="auto",
    type=click.Choice(BACKEND_NAMES),
    help="What runs the graphs, as in pcee-predict.",
)
@option(
    "--intra-op-threads",
    type=click.IntRange(min=1),
    help="onnxruntime CPU threads per layer session (default: one per core).",
)
@option(
    "--max-batch-size",
    default=32,
    type=click.IntRange(min=1),
    help="Most rows one runtime call takes, gathered across requests.",
)
@option(
    "--max-wait-ms",
    default=2.0,
    type=click.FloatRange(min=0),
    help="How long the first request of a batch waits for others to join it.",
)
@option(
    "--max-queue",
    default=1024,
    type=click.IntRange(min=1),
    help="Most rows waiting for a batch; past it requests get 503 with Retry-After.",
)
@option(
    "--max-body-bytes",
    default=DEFAULT_MAX_BODY_BYTES,
    type=click.IntRange(min=1),
    help="Larger request bodies get 413.",
)
@option(
    "--body-timeout-s",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="A body that has not fully arrived by then gets 408 (slow or stalled clients).",
)
@option(
    "--max-queue-wait-ms",
    default=5000.0,
    type=click.FloatRange(min=0),
    help="A request not started within this time of its arrival (its first bytes) gets 503 with Retry-After and never runs (0: no limit). "
    "A request may ask for less: header X-Request-Timeout-Ms, or OIP's parameters.timeout in microseconds (then 504).",
)
@option(
    "--drain-timeout-s",
    default=30.0,
    type=click.FloatRange(min=0, min_open=True),
    help="On SIGTERM, the process is gone within this time: admitted requests run until shortly before it, "
    "and those still waiting then get 503.",
)
@option(
    "--max-header-bytes",
    default=ConnectionLimits.max_header_bytes,
    type=click.IntRange(min=1),
    help="A request line plus headers larger than this gets 431 and the connection is closed.",
)
@option(
    "--header-timeout-s",
    default=ConnectionLimits.header_timeout_s,
    type=click.FloatRange(min=0, min_open=True),
    help="A connection that has not sent a whole request head this long after connecting (or starting its next request) is closed (408 if part came).",
)
@option(
    "--keep-alive-timeout-s",
    default=ConnectionLimits.keep_alive_timeout_s,
    type=click.FloatRange(min=0, min_open=True),
    help="An idle keep-alive connection is closed after this long.",
)
@option(
    "--max-connections",
    default=ConnectionLimits.max_connections,
    type=click.IntRange(min=1),
    help="Past this many open connections, a new one gets 503 and is closed (keep it under the process's open-file limit).",
)
@option(
    "--slo-p99-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="Adaptive: the p99 latency target (arrival to answer) the controller holds. Needs --adaptive-points.",
)
@option(
    "--adaptive-points",
    help="Adaptive: saved point names (and `full`, which every bundle serves), most accurate first (e.g. full,speedup-0.50,speedup-0.75); the order is checked against their layer speed-ups at load. The server starts at the first.",
)
@option(
    "--dwell-s",
    default=10.0,
    type=click.FloatRange(min=0),
    help="Adaptive: the least time between two switches.",
)
@option(
    "--latency-window-s",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Adaptive: the rolling window the p99 is taken over.",
)
@option(
    "--shadow-fraction",
    default=0.01,
    type=click.FloatRange(0, 1),
    help="Fraction of served rows re-run on the full model, off the request path, for the drift metric (0: off).",
)
@option(
    "--ray",
    "on_ray",
    is_flag=True,
    envvar="PCEE_RAY",
    help="Serve on Ray Serve instead: a local Ray cluster, or the one RAY_ADDRESS names. Needs pcee[ray].",
)
@option(
    "--replicas",
    default=1,
    type=click.IntRange(min=1),
    help="With --ray: replicas of the deployment, each loading the bundle once.",
)
@option(
    "--replica-cpus",
    default=1.0,
    type=click.FloatRange(min=0),
    help="With --ray: CPUs each replica reserves; also its default --intra-op-threads.",
)
@option(
    "--log-level",
    default="info",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="Server log level.",
)
@option(
    "--log-format",
    default="text",
    type=click.Choice(LOG_FORMATS),
    help="text: timestamped lines; json: one JSON object per line (time, level, logger, message, request fields).",
)
@option(
    "--access-log/--no-access-log",
    default=False,
    help="Log one line per request with its X-Request-ID (costs throughput).",
)
def main(
    bundle_dir: Path,
    host: str,
    port: int,
    model_name: str | None,
    operating_point: str | None,
    backend: str,
    intra_op_threads: int | None,
    max_batch_size: int,
    max_wait_ms: float,
    max_queue: int,
    max_body_bytes: int,
    body_timeout_s: float,
    max_queue_wait_ms: float,
    drain_timeout_s: float,
    max_header_bytes: int,
    header_timeout_s: float,
    keep_alive_timeout_s: float,
    max_connections: int,
    slo_p99_ms: float | None,
    adaptive_points: str | None,
    dwell_s: float,
    latency_window_s: float,
    shadow_fraction: float,
    on_ray: bool,
    replicas: int,
    replica_cpus: float,
    log_level: str,
    log_format: str,
    access_log: bool,
) -> None:
    """Serve an exported bundle over HTTP, batching rows across concurrent requests.

    \b
    Routes:
      POST /v2/models/{name}/infer   Open Inference Protocol v2 (KServe, Triton, Seldon clients)
      POST /v1/classify              {"texts": [...], "text_pairs": [...]?, "operating_point": "name"?}
      GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready,
           /v2/models/{name}/config (Triton's shape); every model route also under .../versions/1/
      GET  /metrics                  Prometheus metrics (pcee_*)
      PUT  /v1/operating-point       switch live; needs Authorization: Bearer $PCEE_ADMIN_TOKEN
                                     (the route is off, 404, when PCEE_ADMIN_TOKEN is unset)

    \b
    Example:
      pcee-serve runs/sst2-pcee --port 8000
      curl -s localhost:8000/v1/classify -d '{"texts": ["a gripping, funny film"]}'

    Every option also reads an environment variable (shown with each option), and BUNDLE_DIR
    reads PCEE_BUNDLE_DIR.

    \b
    Adaptive operating point (the paper's "peak hours" mode, automatic):
      pcee-serve runs/sst2-pcee --slo-p99-ms 50 --adaptive-points quality,speedup-0.50,speedup-0.75
    steps to the next faster saved point when the rolling p99 or the queue wait passes 0.9 x the
    target, and back when both are under 0.5 x the target, at most once per --dwell-s.

    SIGTERM drains: readiness turns off and new requests get 503 with Retry-After while the server
    still listens; admitted requests are answered until shortly before --drain-timeout-s, those
    still queued then get 503, and the process exits 0 within the timeout. Ready (200 on
    /v2/health/ready) comes after the bundle has loaded and one warm-up batch has run.

    \b
    Scale-out on Ray Serve (pip install "pcee[ray]"):
      pcee-serve runs/sst2-pcee --ray --replicas 2                     # a local Ray cluster
      RAY_ADDRESS=ray://head:10001 pcee-serve /shared/sst2-pcee --ray --replicas 8
    Each replica serves this same app (every route, limit and answer), loading the bundle once.
    The bundle path must exist on every node. The adaptive controller and the admin route are
    single-process only; /metrics and the shadow run are per replica.
    """
    logging.config.dictConfig(logging_config(log_level, log_format, access_log))
    settings = ServerSettings(
        model_name=model_name or bundle_dir.resolve().name,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
        max_queue_wait_ms=max_queue_wait_ms,
        drain_timeout_s=drain_timeout_s,
        operating_point=operating_point,
        admin_token=os.environ.get(ADMIN_TOKEN_VARIABLE) or None,
        shadow_fraction=shadow_fraction,
        controller=controller_settings(
            slo_p99_ms, adaptive_points, dwell_s, latency_window_s, operating_point
        ),
    )
    if on_ray:
        serve_on_ray(bundle_dir, settings, backend, intra_op_threads, replicas, replica_cpus, host, port)
        return
    refuse_ray_only_options("replicas", "replica_cpus")
    load = functools.partial(
        EarlyExitRuntime.from_bundle, bundle_dir, backend=backend, intra_op_threads=intra_op_threads
    )
    app = create_app(settings, load)
    limits = ConnectionLimits(max_header_bytes, header_timeout_s, keep_alive_timeout_s, max_connections)
    config = server_config(app, settings, limits, host, port, log_level, log_format, access_log)
    server = DrainingServer(config, app.state.service)
    # uvicorn re-raises the signal it drained on once it is done; a completed drain is a clean exit here.
    for drained in (signal.SIGTERM, signal.SIGINT):
        signal.signal(drained, lambda *_: None)
    server.run()
    # The runtime and every thread are closed by now. The interpreter's own teardown (unloading
    # onnxruntime and numpy) can take a second on a busy machine, past the drain timeout: skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(server.exit_code)
