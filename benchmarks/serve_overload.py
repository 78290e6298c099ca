"""Overload against pcee-serve's deadlines: do the answered requests stay near the deadline, and do the rest get fast 503s?

One open-loop rate (the Poisson client of `serve_load`) against a `pcee-serve` started here, well
past what it can hold, then the server's own counts from `/metrics`: the rows it classified
against the rows its clients got back (the difference is work for clients that had gone), and the
requests it answered without running, by reason. Latencies count from each request's scheduled
send time, for the answered requests (200) and for the refused ones (503/504) apart.

    python -m pcee.benchmarks.serve_overload --bundle runs/demo/sst2-pcee --rate 300 --duration-s 8 \\
        --rows-per-request 4 --timeout-s 2 -- --max-batch-size 1 --intra-op-threads 1 --max-queue-wait-ms 1000
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from pcee.runtime import PceeError

from .serve_load import (
    DEFAULT_DATA,
    Connections,
    Labelled,
    LoadPlan,
    Reply,
    run_rate,
    running_server,
    started_server,
)


@dataclass(frozen=True)
class ServerCounts:
    """What the server says it did: rows classified, and requests answered without running, by reason."""

    rows_classified: int
    dropped: dict[str, int]
    queued_rows: int = 0
    # /v1/classify answers (any status) the server itself timed, arrival to answer, at most each bucket's seconds
    answers_within_s: dict[str, int] = field(default_factory=dict)

    @classmethod
    def scrape(cls, url: str) -> ServerCounts:
        text = httpx.get(url + "/metrics", timeout=30).text
        rows, dropped, queued, within = 0, Counter(), 0, {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "pcee_rows_total":
                    rows += int(sample.value)
                elif sample.name == "pcee_requests_dropped_total":
                    dropped[sample.labels["reason"]] += int(sample.value)
                elif sample.name == "pcee_queue_rows":
                    queued = int(sample.value)
                elif (
                    sample.name == "pcee_request_duration_seconds_bucket"
                    and sample.labels["route"] == "classify"
                ):
                    within[sample.labels["le"]] = int(sample.value)
        return cls(rows, dict(dropped), queued, within)

    @classmethod
    def settled(cls, url: str, within_s: float = 120.0) -> ServerCounts:
        """The counts once the server's queue is empty (a server without deadlines still works for gone clients)."""
        deadline = time.monotonic() + within_s
        counts = cls.scrape(url)
        while counts.queued_rows and time.monotonic() < deadline:
            time.sleep(0.5)
            counts = cls.scrape(url)
        time.sleep(0.5)  # the last batch
        return cls.scrape(url)

    def since(self, earlier: ServerCounts) -> ServerCounts:
        reasons = set(self.dropped) | set(earlier.dropped)
        return ServerCounts(
            self.rows_classified - earlier.rows_classified,
            {
                reason: self.dropped.get(reason, 0) - earlier.dropped.get(reason, 0)
                for reason in sorted(reasons)
            },
            answers_within_s={
                le: count - earlier.answers_within_s.get(le, 0) for le, count in self.answers_within_s.items()
            },
        )


@dataclass(frozen=True)
class Latencies:
    count: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, replies: list[Reply]) -> Latencies:
        if not replies:
            return cls(0, None, None, None)
        milliseconds = np.array([reply.latency_s for reply in replies]) * 1000.0
        return cls(
            len(replies),
            float(np.percentile(milliseconds, 50)),
            float(np.percentile(milliseconds, 99)),
            float(milliseconds.max()),
        )


@dataclass(frozen=True)
class OverloadReport:
    offered_rps: float
    sent: int
    answered: Latencies
    refused: Latencies  # 503 and 504: answered without running
    outcomes: dict[str, int]  # status codes, and timeout / reset / connect for no answer
    rows_answered: int
    server: ServerCounts
    server_args: list[str]


async def overload(url: str, data: Labelled, plan: LoadPlan) -> list[Reply]:
    connections = Connections(plan.connections, plan.timeout_s)
    try:
        return await run_rate(connections, url, data, plan.rates[0], plan, np.random.default_rng(plan.seed))
    finally:
        await connections.close()


def report_of(
    plan: LoadPlan, replies: list[Reply], server: ServerCounts, server_args: list[str]
) -> OverloadReport:
    answered = [reply for reply in replies if reply.status == 200]
    return OverloadReport(
        offered_rps=plan.rates[0],
        sent=len(replies),
        answered=Latencies.of(answered),
        refused=Latencies.of([reply for reply in replies if reply.status in (503, 504)]),
        outcomes=dict(
            Counter(str(reply.status) if reply.status is not None else reply.error for reply in replies)
        ),
        rows_answered=sum(reply.rows for reply in answered),
        server=server,
        server_args=server_args,
    )


def format_report(report: OverloadReport) -> str:
    def line(name: str, latencies: Latencies) -> str:
        if not latencies.count:
            return f"{name:>9}: none"
        return (
            f"{name:>9}: {latencies.count:6d}   p50 {latencies.p50_ms:7.1f} ms   p99 {latencies.p99_ms:7.1f} ms"
            f"   max {latencies.max_ms:7.1f} ms"
        )

    return "\n".join(
        [
            f"{report.offered_rps:g} requests/s offered, {report.sent} sent; pcee-serve {' '.join(report.server_args)}",
            line("answered", report.answered),
            line("503/504", report.refused),
            f" outcomes: {report.outcomes}",
            f"     rows: {report.server.rows_classified} classified by the server, {report.rows_answered} answered",
            f"  dropped: {report.server.dropped or 'none'} (answered without running, or client gone)",
            f"   server: answers it timed (arrival to answer, any status) within each bucket's seconds: "
            f"{report.server.answers_within_s}",
        ]
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Start `pcee-serve BUNDLE` on a free loopback port for the run; arguments after -- go to pcee-serve.",
)
@click.option("--url", help="Overload a server that is already running instead (loopback only).")
@click.option(
    "--rate", default=300.0, type=click.FloatRange(min=0, min_open=True), help="Offered requests per second."
)
@click.option(
    "--duration-s", default=8.0, type=click.FloatRange(min=0, min_open=True), help="Length of the run."
)
@click.option("--rows-per-request", default=4, type=click.IntRange(min=1), help="Texts per request.")
@click.option(
    "--timeout-s",
    default=2.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Each client gives up this long after its request's scheduled time.",
)
@click.option(
    "--connections",
    default=900,
    type=click.IntRange(min=1),
    help="Requests in flight at once; keep it above rate x timeout so that no request waits in the client, "
    "and under the server's --max-connections.",
)
@click.option("--seed", default=0, help="Seed of the arrival times.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
def main(
    bundle_dir: Path | None,
    url: str | None,
    rate: float,
    duration_s: float,
    rows_per_request: int,
    timeout_s: float,
    connections: int,
    seed: int,
    as_json: bool,
    server_args: tuple[str, ...],
) -> None:
    """Overload pcee-serve at one open-loop rate and report answered and refused latencies and wasted rows.

    \b
    Example (the server on one core, the client on the other):
      taskset -c 0 pcee-serve runs/demo/sst2-pcee --port 8000 --max-batch-size 1 --intra-op-threads 1 \\
          --max-queue-wait-ms 1000 &
      taskset -c 1 python -m pcee.benchmarks.serve_overload --url http://127.0.0.1:8000 --rate 150
    """
    if (bundle_dir is None) == (url is None):
        raise click.UsageError("give --bundle (start a server) or --url (use a running one)")
    if server_args and url is not None:
        raise click.UsageError(
            "arguments after -- go to the pcee-serve that --bundle starts; with --url there is none"
        )
    plan = LoadPlan((rate,), duration_s, 1_000_000, rows_per_request, connections, timeout_s, seed)
    data = Labelled.sst2(Path(str(DEFAULT_DATA)))
    try:
        with started_server(bundle_dir, server_args) if url is None else running_server(url) as target:
            before = ServerCounts.scrape(target)
            replies = asyncio.run(overload(target, data, plan))
            server = ServerCounts.settled(target).since(before)
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    report = report_of(plan, replies, server, list(server_args))
    click.echo(json.dumps(asdict(report), indent=2) if as_json else format_report(report))


if __name__ == "__main__":
    main()
