"""Ray Serve scale-out: each replica serves pcee-serve's own ASGI app, one bundle load per replica.

    pcee-serve runs/sst2-pcee --ray --replicas 2            # a local Ray cluster on this machine
    RAY_ADDRESS=ray://head:10001 pcee-serve /shared/sst2-pcee --ray --replicas 8

One data plane: the deployment is `serve.ingress` around the app `create_app` builds (late-bound,
`__serve_build_asgi_app__`, so the bundle path and settings travel as constructor arguments), so
every route, check, error answer, metric, deadline and the batcher are the single-process server's.
Ray Serve runs the app's lifespan: startup when a replica starts (the app waits there until the
bundle is loaded and warm, so Ray routes nothing to a loading replica), shutdown when it stops.
Ray's proxy spreads requests over replicas.

Drain: on SIGTERM the driver redeploys the same application with `user_config={"draining": true}`.
Serve applies a user_config change in place: each replica's `reconfigure` runs the app's drain
(readiness 503, new requests 503 with Retry-After, admitted ones answered within the drain time),
and `serve.run` returns once every replica has drained. Only then is the application removed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.serve import Application
from starlette.applications import Starlette

from pcee.runtime import EarlyExitRuntime, Manifest, PolicyError

from .app import create_app
from .settings import ServerSettings

log = logging.getLogger("pcee.serving")

CONSTRUCTOR_RETRIES = (
    3  # a transient node problem is retried; a broken bundle fails the deploy in seconds, not minutes
)
DRAINING = "draining"


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


@serve.ingress()
class EarlyExitReplica:
    """One replica: pcee-serve's app over one runtime; `reconfigure` drains it."""

    def __init__(self, settings: ServerSettings, options: ReplicaOptions):
        self.settings = settings
        self.options = options

    def __serve_build_asgi_app__(self) -> Starlette:
        load = functools.partial(
            EarlyExitRuntime.from_bundle,
            self.options.bundle_dir,
            backend=self.options.backend,
            intra_op_threads=self.options.threads,
        )
        # Ray's proxy echoes X-Request-ID itself (and makes one when absent); the app logs the same id
        return create_app(self.settings, load, ready_before_serving=True, echo_request_id=False)

    async def reconfigure(self, config: dict) -> None:
        """`{"draining": true}`: drain this replica's app (Serve calls this on every replica)."""
        app = getattr(self, "_asgi_app", None)  # absent on the first call, before the app is built
        if config.get(DRAINING) and app is not None:
            await app.state.service.drain()


EarlyExitDeployment = serve.deployment(EarlyExitReplica)


def application(settings: ServerSettings, options: ReplicaOptions, draining: bool = False) -> Application:
    """The bound Ray Serve application: `serve.run(application(...))` deploys it on the connected cluster."""
    return EarlyExitDeployment.options(
        name=settings.model_name,
        user_config={DRAINING: draining},
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        # the app queues and batches rows itself (bounded by --max-queue rows): let its requests in
        max_ongoing_requests=settings.max_queue + settings.max_batch_size,
        max_queued_requests=settings.max_queue,
        backpressure_config={"retry_after_s": 1},  # 503 with Retry-After: 1, as pcee-serve answers
        max_constructor_retry_count=CONSTRUCTOR_RETRIES,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    ).bind(settings, options)


def replica_settings(settings: ServerSettings) -> ServerSettings:
    """The admin route would switch one replica of many: it is off under Ray."""
    return replace(settings, admin_token=None)


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


def deploy(settings: ServerSettings, options: ReplicaOptions, host: str, port: int) -> None:
    """Serve's HTTP proxy on host:port and the application behind it, once every replica is ready (after `connect`).

    A replica that cannot start makes `serve.run` raise RuntimeError (after Ray's constructor retries).
    """
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(settings, options), name=settings.model_name, route_prefix="/")


def drain(settings: ServerSettings, options: ReplicaOptions) -> None:
    """Every replica drains in place (see the module's docstring); returns once all have."""
    log.info("draining %d replica(s) (at most %g s)", options.replicas, settings.drain_timeout_s)
    serve.run(application(settings, options, draining=True), name=settings.model_name, route_prefix="/")


def local_cluster_options() -> dict:
    """A cluster this process starts itself gets node address 127.0.0.1; RAY_ADDRESS names one to join instead."""
    return {} if os.environ.get("RAY_ADDRESS") else {"_node_ip_address": "127.0.0.1"}


def serve_until_signalled(settings: ServerSettings, options: ReplicaOptions, host: str, port: int) -> None:
    """Deploy, serve until SIGTERM or SIGINT, drain, then remove the application (a local cluster goes with it).

    A local cluster is shut down whole after the drain, proxy included, so late clients find no
    listener rather than a proxy answering 404 for a removed application; on a joined cluster the
    application is deleted (its routes then answer 404 there: readiness has been 503 since the drain began).
    """
    settings = replica_settings(settings)
    stop = threading.Event()
    joined = bool(os.environ.get("RAY_ADDRESS"))
    deployed = False
    try:
        connect(settings, options)
        for handled in (
            signal.SIGTERM,
            signal.SIGINT,
        ):  # after ray.init, which installs its own (sys.exit on SIGTERM)
            signal.signal(handled, lambda *_: stop.set())
        deploy(settings, options, host, port)
        deployed = True
        log.info(
            "pcee-serve on Ray Serve: %d replica(s) of %s at http://%s:%d",
            options.replicas,
            settings.model_name,
            host,
            port,
        )
        stop.wait()
        drain(settings, options)
    finally:
        if ray.is_initialized():
            if joined and deployed:
                serve.delete(settings.model_name)
            ray.shutdown()
