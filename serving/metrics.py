"""Prometheus metrics of one server, in their own registry (two apps in one process never share counts)."""

from __future__ import annotations

import collections

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from pcee.runtime import OperatingPoint, PredictionResult

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to the largest batch the server forms."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    return (*buckets, float(max_batch_size))


def label_value(value: object) -> str:
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


class ServingMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "pcee_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "pcee_request_duration_seconds",
            "Time from request start to response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "pcee_queue_wait_seconds",
            "Time a request's rows waited for their batch to start.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "pcee_batch_duration_seconds",
            "Time one runtime call took.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "pcee_batch_rows",
            "Rows per runtime call.",
            buckets=batch_size_buckets(max_batch_size),
            registry=registry,
        )
        self.rows = Counter(
            "pcee_rows", "Rows classified, by the layer they exited at.", ["exit_layer"], registry=registry
        )
        self.layers_run = Counter(
            "pcee_layers_run", "Transformer layers run, summed over rows.", registry=registry
        )
        self.layers_possible = Counter(
            "pcee_layers_possible",
            "Layers the full model would have run (rows x layers); 1 - run/possible is the layer speed-up.",
            registry=registry,
        )
        self.requests_dropped = Counter(
            "pcee_requests_dropped",
            "Admitted requests taken out of the queue before running, by reason: queue_wait (--max-queue-wait-ms), "
            "request_timeout (the request's own timeout), client_disconnected, shutdown (past the drain timeout).",
            ["reason"],
            registry=registry,
        )
        self.queue_rows = Gauge(
            "pcee_queue_rows", "Rows admitted and waiting for a batch.", registry=registry
        )
        self.ready = Gauge(
            "pcee_ready", "1 when the model is loaded, warmed up and not draining.", registry=registry
        )
        self.operating_point = Info(
            "pcee_operating_point", "The operating point requests without one use.", registry=registry
        )
        self.point_switches = Counter(
            "pcee_operating_point_switches",
            "Live operating point switches, by who asked.",
            ["source"],
            registry=registry,
        )
        self.adaptive_p99_seconds = Gauge(
            "pcee_adaptive_p99_seconds",
            "Rolling p99 request latency the controller judges by (NaN: too few requests).",
            registry=registry,
        )
        self.adaptive_level = Gauge(
            "pcee_adaptive_level",
            "Position on the adaptive ladder: 0 is the most accurate point.",
            registry=registry,
        )
        self.shadow_rows = Counter(
            "pcee_shadow_rows", "Served rows re-run on the full model.", registry=registry
        )
        self.shadow_agreed_rows = Counter(
            "pcee_shadow_agreed_rows",
            "Shadow rows whose served label equals the full model's.",
            registry=registry,
        )
        self.shadow_dropped_rows = Counter(
            "pcee_shadow_dropped_rows",
            "Sampled rows dropped because the shadow backlog was full.",
            registry=registry,
        )
        self.shadow_agreement = Gauge(
            "pcee_shadow_agreement",
            "Agreement with the full model over the last 1000 shadow rows (NaN before any).",
            registry=registry,
        )
        self.shadow_agreement.set(float("nan"))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def observe_batch(self, result: PredictionResult) -> None:
        self.batch_rows.observe(len(result.predictions))
        self.batch_seconds.observe(result.elapsed_seconds)
        self.layers_run.inc(result.layers_run)
        self.layers_possible.inc(len(result.predictions) * result.num_layers)
        for layer, count in collections.Counter(row.exit_layer for row in result.predictions).items():
            self.rows.labels(exit_layer=str(layer)).inc(count)

    def show_point(self, point: OperatingPoint) -> None:
        self.operating_point.info({key: label_value(value) for key, value in point.to_dict().items()})

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
