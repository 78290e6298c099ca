"""Open-loop load against `pcee-serve`: Poisson arrivals at fixed rates, on loopback only.

Each request is sent at its scheduled time whether or not earlier ones have been answered (an
open loop, as real traffic is), so an overloaded server shows as queueing and 503s rather than as
a politely slower client. At most --connections requests are in flight; later arrivals wait in
the client, and since latency runs from the scheduled send time, that wait counts too: a late
client cannot hide a slow server. Per rate it reports the achieved throughput, p50/p99 latency
of the answered requests, errors by kind, the mean layer speed-up and accuracy of the answers,
and the operating point the server used second by second (the adaptive controller's moves).

    # start the server itself (arguments after -- go to pcee-serve), then three rates
    python -m pcee.benchmarks.serve_load run --bundle runs/demo/sst2-pcee --rates 20,40,80 -- --operating-point speedup-0.50
    # a server that is already running
    python -m pcee.benchmarks.serve_load run --url http://127.0.0.1:8000 --rates 50 --duration-s 20 --json
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import click
import numpy as np

from pcee.modeling.data import load_glue_file
from pcee.runtime import EarlyExitRuntime, OperatingPoint, PceeError, require_extra

try:
    import httpx
except ImportError:  # the load test's client, not part of pcee[serve]: `main` says what to install
    httpx = None

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
READY_TIMEOUT_S = 180.0
DEFAULT_DATA = files("pcee.demo") / "data" / "dev.tsv"


class LoadTestError(PceeError, ValueError):
    """The load test cannot run as asked (a non-loopback URL, a server that does not come up)."""


@dataclass(frozen=True)
class LoadPlan:
    rates: tuple[float, ...]
    duration_s: float
    max_requests: int
    rows_per_request: int = 1
    connections: int = 128
    timeout_s: float = 10.0
    seed: int = 0
    slo_p99_ms: float | None = None


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    labels: list[str]

    @classmethod
    def sst2(cls, path: Path) -> Labelled:
        data = load_glue_file("sst2", path)
        return cls(data.texts, [data.label_names[label] for label in data.labels])


@dataclass
class Reply:
    """One request's fate; `error` is None for a 200, else 4xx, 5xx, reset, connect or timeout."""

    scheduled_s: float
    latency_s: float
    status: int | None = None
    error: str | None = None
    rows: int = 0
    layer_speedup: float = 0.0
    correct: int = 0
    point: str | None = None


@dataclass
class RateReport:
    """One rate's outcome. `sent` counts every scheduled request: answered, refused, or timed out.

    Latencies are over the answered (200) requests; `accuracy` is the share of answered rows whose
    label is the data's label name.
    """

    offered_rps: float
    sent: int
    answered: int
    achieved_rps: float
    achieved_rows_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: dict[str, int]
    statuses: dict[str, int]
    layer_speedup: float | None
    accuracy: float | None
    point_timeline: list[dict[str, int]]
    client_cpu_cores: float = (
        0.0  # CPU this load client used, in cores: what it took from a server on the same machine
    )
    sustainable: bool | None = None
    fraction_of_in_process: float | None = None


@dataclass
class LoadReport:
    url: str
    plan: dict
    rates: list[RateReport] = field(default_factory=list)
    in_process_rows_per_s: float | None = None
    max_sustainable_rps: float | None = None


# -- the load ---------------------------------------------------------------------------------------
def arrival_times(rate: float, duration_s: float, max_requests: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals: exponential gaps of mean 1/rate, cut at duration_s or max_requests."""
    gaps = rng.exponential(1.0 / rate, size=max_requests)
    times = np.cumsum(gaps) - gaps[0]  # the first request goes at once
    return times[times < duration_s]


def request_texts(data: Labelled, index: int, rows: int) -> tuple[list[str], list[str]]:
    picked = [(index * rows + offset) % len(data.texts) for offset in range(rows)]
    return [data.texts[i] for i in picked], [data.labels[i] for i in picked]


def transport_error_kind(error: httpx.TransportError) -> str:
    if isinstance(error, httpx.TimeoutException):
        return "timeout"
    if isinstance(error, httpx.ConnectError):
        return "connect"
    return "reset"  # the connection closed or broke mid-exchange (RemoteProtocolError, ReadError, WriteError)


class Connections:
    """`size` keep-alive connections, one httpx client each; a request waits for a free one.

    httpx's own pool scans every connection for every request it holds, which costs more CPU than
    the server spends per request once it holds a hundred: many one-connection clients do not.
    """

    def __init__(self, size: int, timeout_s: float):
        tls = ssl.create_default_context()  # loopback is plain HTTP; one context instead of one per client
        self.clients = [
            httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=timeout_s, verify=tls)
            for _ in range(size)
        ]
        self.free: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in self.clients:
            self.free.put_nowait(client)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[httpx.AsyncClient]:
        client = await self.free.get()
        try:
            yield client
        finally:
            self.free.put_nowait(client)

    async def close(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients))


async def send(
    connections: Connections,
    url: str,
    texts: list[str],
    labels: list[str],
    scheduled: float,
    origin: float,
    timeout_s: float,
) -> Reply:
    """One request: it waits for a free connection, and gets `timeout_s` from its scheduled time in all."""
    reply = Reply(scheduled_s=scheduled - origin, latency_s=0.0)
    try:
        await asyncio.wait_for(
            post(connections, url, texts, labels, reply), timeout_s - (time.perf_counter() - scheduled)
        )
    except asyncio.TimeoutError:
        reply.status, reply.error = None, "timeout"
    reply.latency_s = time.perf_counter() - scheduled
    return reply


async def post(connections: Connections, url: str, texts: list[str], labels: list[str], reply: Reply) -> None:
    async with connections.connection() as client:
        try:
            response = await client.post(url + "/v1/classify", json={"texts": texts})
        except httpx.TransportError as error:
            reply.error = transport_error_kind(error)
            return
    reply.status = response.status_code
    if response.status_code == 200:
        read_answer(reply, response.json(), labels)
    else:
        reply.error = f"{response.status_code // 100}xx"


def read_answer(reply: Reply, answer: dict, labels: list[str]) -> None:
    predictions = answer["predictions"]
    reply.rows = len(predictions)
    reply.layer_speedup = answer["layer_speedup"]
    reply.correct = sum(row["label"] == label for row, label in zip(predictions, labels))
    point = answer["operating_point"]
    reply.point = point.get("name") or OperatingPoint.from_dict(point).describe()


async def run_rate(
    connections: Connections, url: str, data: Labelled, rate: float, plan: LoadPlan, rng: np.random.Generator
) -> list[Reply]:
    origin = time.perf_counter()
    tasks = []
    for index, offset in enumerate(arrival_times(rate, plan.duration_s, plan.max_requests, rng)):
        scheduled = origin + offset
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        texts, labels = request_texts(data, index, plan.rows_per_request)
        tasks.append(
            asyncio.create_task(send(connections, url, texts, labels, scheduled, origin, plan.timeout_s))
        )
    return list(await asyncio.gather(*tasks))


async def measure_rate(
    connections: Connections, url: str, data: Labelled, rate: float, plan: LoadPlan, rng: np.random.Generator
) -> RateReport:
    wall, cpu = time.perf_counter(), time.process_time()
    replies = await run_rate(connections, url, data, rate, plan, rng)
    report = summarize_rate(rate, replies, plan.slo_p99_ms)
    report.client_cpu_cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return report


def summarize_rate(rate: float, replies: list[Reply], slo_p99_ms: float | None) -> RateReport:
    answered = [reply for reply in replies if reply.error is None]
    latencies_ms = np.array([reply.latency_s for reply in answered]) * 1000.0
    span = max((reply.scheduled_s + reply.latency_s for reply in replies), default=0.0)
    rows = sum(reply.rows for reply in answered)
    report = RateReport(
        offered_rps=rate,
        sent=len(replies),
        answered=len(answered),
        achieved_rps=len(answered) / span if span else 0.0,
        achieved_rows_per_s=rows / span if span else 0.0,
        p50_ms=float(np.percentile(latencies_ms, 50)) if answered else None,
        p99_ms=float(np.percentile(latencies_ms, 99)) if answered else None,
        errors=dict(Counter(reply.error for reply in replies if reply.error is not None)),
        statuses=dict(Counter(str(reply.status) for reply in replies if reply.status is not None)),
        layer_speedup=sum(reply.layer_speedup * reply.rows for reply in answered) / rows if rows else None,
        accuracy=sum(reply.correct for reply in answered) / rows if rows else None,
        point_timeline=point_timeline(answered),
    )
    if slo_p99_ms is not None:
        report.sustainable = bool(answered) and not report.errors and report.p99_ms <= slo_p99_ms
    return report


def point_timeline(answered: list[Reply]) -> list[dict[str, int]]:
    """Per second of the run (by send time), how many answers each operating point gave."""
    seconds: dict[int, Counter] = {}
    for reply in answered:
        seconds.setdefault(int(reply.scheduled_s), Counter())[reply.point] += 1
    return [dict(seconds.get(second, {})) for second in range(max(seconds, default=-1) + 1)]


async def run_load(url: str, data: Labelled, plan: LoadPlan) -> list[RateReport]:
    rng = np.random.default_rng(plan.seed)
    connections = Connections(plan.connections, plan.timeout_s)
    try:
        return [await measure_rate(connections, url, data, rate, plan, rng) for rate in plan.rates]
    finally:
        await connections.close()


# -- the server under test ----------------------------------------------------------------------------
def require_loopback(url: str) -> str:
    if urlsplit(url).hostname not in LOOPBACK_HOSTS:
        raise LoadTestError(
            f"--url {url!r} is not on this machine; the load test only targets loopback (127.0.0.1, localhost, ::1)"
        )
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def started_server(bundle_dir: Path, server_args: tuple[str, ...]) -> Iterator[str]:
    """`pcee-serve BUNDLE_DIR ...server_args` on a free loopback port until the block ends (then SIGTERM)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "pcee.serving",
        str(bundle_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *server_args,
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(url, process, log)
            yield url
        finally:
            stop(process)


def wait_until_ready(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not is_ready(url):
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise LoadTestError(f"pcee-serve did not become ready (exit code {process.poll()}):\n{tail}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the in-process reference -------------------------------------------------------------------------
@dataclass(frozen=True)
class InProcessReference:
    """`runtime.predict` in this process, closed loop, the way the server calls it: the ceiling HTTP is measured against."""

    bundle_dir: Path
    batch_size: int = 32
    intra_op_threads: int | None = None

    def rows_per_s(self, point: dict, data: Labelled, duration_s: float) -> float:
        with EarlyExitRuntime.from_bundle(self.bundle_dir, intra_op_threads=self.intra_op_threads) as runtime:
            point_object = OperatingPoint.from_dict(point)
            runtime.predict(data.texts[: self.batch_size], operating_point=point_object)  # warm-up
            rows, started, index = 0, time.perf_counter(), 0
            while time.perf_counter() - started < duration_s:
                texts, _ = request_texts(data, index, self.batch_size)
                rows += len(
                    runtime.predict(
                        texts, operating_point=point_object, batch_size=self.batch_size
                    ).predictions
                )
                index += 1
            return rows / (time.perf_counter() - started)


def served_point(url: str, data: Labelled) -> dict:
    return httpx.post(url + "/v1/classify", json={"texts": data.texts[:1]}, timeout=30).json()[
        "operating_point"
    ]


# -- the command ----------------------------------------------------------------------------------------
def parse_rates(context: click.Context, parameter: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers, e.g. 20,40,80"
        ) from None
    if not rates or min(rates) <= 0:
        raise click.BadParameter(f"{value!r}: rates are requests per second, each above 0")
    return rates


def format_report(report: LoadReport) -> str:
    lines = [
        f"open-loop load on {report.url}",
        f"{'offered/s':>9} {'sent':>6} {'ok/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'speed-up':>8} {'acc':>6} {'client':>6}  errors / points",
    ]
    for rate in report.rates:
        points = Counter()
        for second in rate.point_timeline:
            points.update(second)
        lines.append(
            f"{rate.offered_rps:9.1f} {rate.sent:6d} {rate.achieved_rps:7.1f} {number(rate.p50_ms):>7} {number(rate.p99_ms):>7} "
            f"{number(rate.layer_speedup, 3):>8} {number(rate.accuracy, 3):>6} {rate.client_cpu_cores:6.2f}  {rate.errors or 'no errors'} {dict(points)}"
        )
    if report.in_process_rows_per_s is not None:
        lines.append(f"in-process runtime at the served point: {report.in_process_rows_per_s:.1f} rows/s")
    if report.plan["slo_p99_ms"] is not None:
        lines.append(
            f"max sustainable rate at p99 <= {report.plan['slo_p99_ms']:g} ms, no errors: {report.max_sustainable_rps}"
        )
    return "\n".join(lines)


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Open-loop load tests of pcee-serve (`run`) and their p99-against-load figure (`plot`)."""
    require_extra("python -m pcee.benchmarks.serve_load", ("httpx",), "'pcee[serve]' httpx")


@main.command(context_settings=CONTEXT)
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Start `pcee-serve BUNDLE` on a free loopback port for the run; arguments after -- go to pcee-serve. "
    "With --url: the bundle that server serves, for --compare-in-process.",
)
@click.option(
    "--url", help="Load a server that is already running instead (loopback only), e.g. http://127.0.0.1:8000."
)
@click.option(
    "--rates",
    default="10,20,40",
    callback=parse_rates,
    help="Offered loads in requests per second, comma-separated, run in order.",
)
@click.option(
    "--duration-s",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Length of each rate's run.",
)
@click.option(
    "--max-requests", default=2000, type=click.IntRange(min=1), help="At most this many requests per rate."
)
@click.option("--rows-per-request", default=1, type=click.IntRange(min=1), help="Texts per request.")
@click.option(
    "--connections",
    default=128,
    type=click.IntRange(min=1),
    help="Requests in flight at once, each on its own connection; later arrivals wait for one, and the wait counts in their latency. Set it above the server's --max-queue to see its 503s.",
)
@click.option(
    "--timeout-s",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="A request unanswered this long after its scheduled time counts as a timeout.",
)
@click.option(
    "--slo-p99-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="Mark each rate sustainable or not: p99 within this and no errors.",
)
@click.option(
    "--compare-in-process",
    is_flag=True,
    help="With --bundle: after the load, time runtime.predict in this process at the point the server used (batches of --in-process-batch-size).",
)
@click.option(
    "--in-process-batch-size",
    default=32,
    type=click.IntRange(min=1),
    help="Batch size of the in-process reference (pcee-serve's --max-batch-size).",
)
@click.option(
    "--in-process-threads",
    type=click.IntRange(min=1),
    help="onnxruntime threads of the in-process reference (pcee-serve's --intra-op-threads; default: one per core).",
)
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An SST-2 style TSV (sentence, label) the texts come from; default: the shipped SST-2 dev sample.",
)
@click.option("--seed", default=0, help="Seed of the arrival times.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
def run(
    bundle_dir: Path | None,
    url: str | None,
    rates: tuple[float, ...],
    duration_s: float,
    max_requests: int,
    rows_per_request: int,
    connections: int,
    timeout_s: float,
    slo_p99_ms: float | None,
    compare_in_process: bool,
    in_process_batch_size: int,
    in_process_threads: int | None,
    data: Path | None,
    seed: int,
    as_json: bool,
    server_args: tuple[str, ...],
) -> None:
    """Open-loop load (Poisson arrivals) on pcee-serve's /v1/classify, one rate after another.

    Give --bundle (the server is started here, with the arguments after --) or --url.

    \b
    The server alone, against the runtime on the same core (the client on the other one):
      taskset -c 0 pcee-serve runs/demo/sst2-pcee --port 8000 --intra-op-threads 1 &
      taskset -c 1 python -m pcee.benchmarks.serve_load run --url http://127.0.0.1:8000 --rates 100,200 \
          --bundle runs/demo/sst2-pcee --compare-in-process --in-process-threads 1
    (that last step times the runtime on core 1 while the idle server waits on core 0)

    \b
    Examples:
      python -m pcee.benchmarks.serve_load run --bundle runs/demo/sst2-pcee --rates 20,40,80 -- --operating-point speedup-0.50
      python -m pcee.benchmarks.serve_load run --bundle runs/demo/sst2-pcee --rates 40 --slo-p99-ms 50 \\
          -- --slo-p99-ms 50 --adaptive-points quality,speedup-0.50,speedup-0.75
      python -m pcee.benchmarks.serve_load run --bundle runs/demo/sst2-pcee --rates 40 -- --ray --replicas 2
    """
    if bundle_dir is None and url is None:
        raise click.UsageError("give --bundle (start a server) or --url (use a running one)")
    if server_args and url is not None:
        raise click.UsageError(
            "arguments after -- go to the pcee-serve that --bundle starts; with --url there is none"
        )
    if compare_in_process and bundle_dir is None:
        raise click.UsageError("--compare-in-process needs --bundle: the runtime is loaded in this process")
    if url is not None and bundle_dir is not None and not compare_in_process:
        raise click.UsageError("--bundle with --url only names the bundle for --compare-in-process")
    plan = LoadPlan(
        rates, duration_s, max_requests, rows_per_request, connections, timeout_s, seed, slo_p99_ms
    )
    reference = (
        InProcessReference(bundle_dir, in_process_batch_size, in_process_threads)
        if compare_in_process
        else None
    )
    try:
        report = load_test(
            plan, Labelled.sst2(data or Path(str(DEFAULT_DATA))), bundle_dir, url, server_args, reference
        )
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(asdict(report), indent=2) if as_json else format_report(report))


@main.command(context_settings=CONTEXT)
@click.argument("reports", nargs=-1, required=True, metavar="NAME=REPORT.json...")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The figure to write (.png, .svg, .pdf).",
)
@click.option(
    "--slo-p99-ms", type=click.FloatRange(min=0, min_open=True), help="Draw the latency target as a line."
)
def plot(reports: tuple[str, ...], output: Path, slo_p99_ms: float | None) -> None:
    """p99 latency against offered load, one line per `run --json` report (needs matplotlib).

    \b
    Example:
      python -m pcee.benchmarks.serve_load plot full=full.json adaptive=adaptive.json -o p99.png --slo-p99-ms 50
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for name, path in (named_report(value) for value in reports):
        rates = [rate for rate in json.loads(path.read_text())["rates"] if rate["p99_ms"] is not None]
        axes.plot(
            [rate["offered_rps"] for rate in rates],
            [rate["p99_ms"] for rate in rates],
            marker="o",
            label=name,
        )
    if slo_p99_ms is not None:
        axes.axhline(slo_p99_ms, color="grey", linestyle="--", label=f"p99 target {slo_p99_ms:g} ms")
    axes.set(
        xlabel="offered load (requests/s, Poisson)",
        ylabel="p99 latency of answered requests (ms)",
        yscale="log",
    )
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    click.echo(f"wrote {output}")


def named_report(value: str) -> tuple[str, Path]:
    name, separator, path = value.partition("=")
    if not separator or not Path(path).is_file():
        raise click.BadParameter(f"{value!r}: give NAME=REPORT.json, a file written by `run --json`")
    return name, Path(path)


def load_test(
    plan: LoadPlan,
    data: Labelled,
    bundle_dir: Path | None,
    url: str | None,
    server_args: tuple[str, ...],
    reference: InProcessReference | None,
) -> LoadReport:
    with started_server(bundle_dir, server_args) if url is None else running_server(url) as target:
        report = LoadReport(url=target, plan=asdict(plan), rates=asyncio.run(run_load(target, data, plan)))
        point = served_point(target, data) if reference is not None else None
    if reference is not None:
        report.in_process_rows_per_s = reference.rows_per_s(point, data, plan.duration_s)
        for rate in report.rates:
            rate.fraction_of_in_process = rate.achieved_rows_per_s / report.in_process_rows_per_s
    sustainable = [rate.offered_rps for rate in report.rates if rate.sustainable]
    report.max_sustainable_rps = max(sustainable) if sustainable else None
    return report


@contextmanager
def running_server(url: str) -> Iterator[str]:
    """A server someone else started: checked to be on loopback, left running."""
    yield require_loopback(url)


if __name__ == "__main__":
    main()
