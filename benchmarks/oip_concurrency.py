"""Closed-loop load at fixed concurrencies against any OIP v2 server: Triton (pcee-triton) or pcee-serve.

Each of C clients sends one-row requests back to back for a while; per concurrency it reports rows/s
and p50/p99 latency, and, with --bundle, the ratio to the in-process runtime doing the same work:
C threads of this process calling `runtime.predict` on one row at a time, at the same point. The request's text input takes the shape the model's metadata declares ([1]
for pcee-serve, [1, 1] for a Triton model with a batch dimension), so one client measures both.

    python -m pcee.benchmarks.oip_concurrency --url http://127.0.0.1:8000 --model sst2 \
        --concurrency 1,4,16 --bundle runs/demo/sst2-pcee --point demo
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass

import click
import httpx
import numpy as np

from pcee.benchmarks.serve_load import DEFAULT_DATA, Labelled, require_loopback
from pcee.runtime import EarlyExitRuntime, PceeError


@dataclass
class ConcurrencyReport:
    concurrency: int
    requests: int
    errors: int
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    fraction_of_in_process: float | None = None


def text_shape(url: str, model: str) -> list[int]:
    """[1] or [1, 1]: one row, with the batch dimension when the model's metadata has one."""
    metadata = httpx.get(f"{url}/v2/models/{model}", timeout=30).json()
    text = next(tensor for tensor in metadata["inputs"] if tensor["name"] == "text")
    return [1] * len(text["shape"])


def request_body(text: str, shape: list[int], point: str | None) -> bytes:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": [text]}]}
    if point is not None:
        body["parameters"] = {"operating_point": point}
    return json.dumps(body).encode()


def client_loop(url: str, bodies: list[bytes], stop_at: float, latencies: list[float], errors: list[int]):
    with httpx.Client(timeout=30) as client:
        index = 0
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = client.post(url, content=bodies[index % len(bodies)])
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(response.status_code)
            index += 1


def runtime_loop(runtime, texts: list[str], stop_at: float, latencies: list[float], errors: list[int]):
    index = 0
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        runtime.predict([texts[index % len(texts)]])
        latencies.append(time.perf_counter() - started)
        index += 1


def measure(loop, target, work: list, concurrency: int, duration_s: float) -> ConcurrencyReport:
    """`concurrency` threads running `loop(target, their share of work, ...)` until the time is up."""
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    stop_at = started + duration_s
    threads = [
        threading.Thread(target=loop, args=(target, work[offset::concurrency], stop_at, latencies, errors))
        for offset in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    milliseconds = np.asarray(latencies) * 1000
    return ConcurrencyReport(
        concurrency=concurrency,
        requests=len(latencies) + len(errors),
        errors=len(errors),
        rows_per_s=len(latencies) / elapsed,
        p50_ms=float(np.percentile(milliseconds, 50)) if latencies else float("nan"),
        p99_ms=float(np.percentile(milliseconds, 99)) if latencies else float("nan"),
    )


def in_process_reports(
    bundle: str, point: str | None, texts: list[str], concurrencies: list[int], duration_s: float
) -> list[ConcurrencyReport]:
    with EarlyExitRuntime.from_bundle(bundle, operating_point=point) as runtime:
        runtime.predict(texts[:8])  # warm-up
        return [measure(runtime_loop, runtime, texts, count, duration_s) for count in concurrencies]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", required=True, help="The server, on loopback: http://127.0.0.1:PORT")
@click.option("--model", required=True, help="The model's name on that server.")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Comma-separated client counts.")
@click.option("--duration-s", default=10.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--point", help="The saved operating point each request names.  [default: the server's]")
@click.option("--bundle", help="The bundle the server serves: also time the in-process runtime at --point.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def main(url, model, concurrency, duration_s, point, bundle, as_json):
    """Rows/s and p50/p99 latency of one-row requests at each concurrency, against an OIP v2 server."""
    try:
        url = require_loopback(url.rstrip("/"))
        shape = text_shape(url, model)
        texts = Labelled.sst2(DEFAULT_DATA).texts
        bodies = [request_body(text, shape, point) for text in texts]
        infer_url = f"{url}/v2/models/{model}/infer"
        counts = [int(count) for count in concurrency.split(",")]
        reports = [measure(client_loop, infer_url, bodies, count, duration_s) for count in counts]
        references = in_process_reports(bundle, point, texts, counts, duration_s) if bundle else []
        for report, reference in zip(reports, references):
            report.fraction_of_in_process = report.rows_per_s / reference.rows_per_s
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    except httpx.TransportError as error:
        raise click.ClickException(f"cannot reach {url} ({error}); is the server up and ready?") from None
    if as_json:
        summary = {
            "url": url,
            "model": model,
            "point": point,
            "concurrencies": reports,
            "in_process": references,
        }
        click.echo(
            json.dumps(
                {
                    key: [asdict(item) for item in value] if isinstance(value, list) else value
                    for key, value in summary.items()
                }
            )
        )
        return
    click.echo("concurrency  rows/s   p50 ms   p99 ms  errors  of in-process")
    for report in reports:
        share = "" if report.fraction_of_in_process is None else f"{report.fraction_of_in_process:.2f}"
        click.echo(
            f"{report.concurrency:>11}  {report.rows_per_s:>6.1f}  {report.p50_ms:>7.1f}  {report.p99_ms:>7.1f}"
            f"  {report.errors:>6}  {share}"
        )
    for reference in references:
        click.echo(
            f"in-process, {reference.concurrency} threads: {reference.rows_per_s:.1f} rows/s, p99 {reference.p99_ms:.1f} ms"
        )


if __name__ == "__main__":
    main()
