"""`benchmarks/serve_load.py` on a tiny bundle: short open-loop runs against a real pcee-serve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pcee.benchmarks.serve_load import arrival_times, main


@pytest.fixture(scope="module")
def bundle(four_layer_bundle):
    return four_layer_bundle


def run(*arguments: str) -> dict:
    result = CliRunner().invoke(main, ["run", *arguments], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_each_rate_reports_throughput_latency_speedup_and_points(bundle):
    report = run(
        "--bundle",
        str(bundle),
        "--rates",
        "20,60",
        "--duration-s",
        "1",
        "--max-requests",
        "30",
        "--rows-per-request",
        "2",
        "--slo-p99-ms",
        "2000",
        "--compare-in-process",
        "--json",
        "--",
        "--max-wait-ms",
        "2",
    )
    assert [rate["offered_rps"] for rate in report["rates"]] == [20.0, 60.0]
    for rate in report["rates"]:
        assert 0 < rate["sent"] <= 30 and rate["answered"] == rate["sent"]
        assert rate["errors"] == {} and rate["statuses"] == {"200": rate["sent"]}
        assert rate["p50_ms"] <= rate["p99_ms"] and rate["sustainable"] is True
        assert 0.0 <= rate["layer_speedup"] <= 1.0 and 0.0 <= rate["accuracy"] <= 1.0
        assert sum(sum(second.values()) for second in rate["point_timeline"]) == rate["answered"]
        assert rate["fraction_of_in_process"] > 0
    assert report["in_process_rows_per_s"] > 0 and report["max_sustainable_rps"] == 60.0


def test_overload_counts_503s_and_no_resets(bundle):
    report = run(
        "--bundle",
        str(bundle),
        "--rates",
        "400",
        "--duration-s",
        "0.5",
        "--max-requests",
        "200",
        "--json",
        "--",
        "--max-queue",
        "2",
        "--max-wait-ms",
        "50",
    )
    rate = report["rates"][0]
    assert rate["statuses"].get("503", 0) > 0 and rate["errors"].get("5xx") == rate["statuses"]["503"]
    assert set(rate["errors"]) == {"5xx"}, "only 503s: no resets, connection errors or timeouts"
    assert rate["answered"] + rate["statuses"]["503"] == rate["sent"]


def test_only_loopback_urls_are_loaded():
    result = CliRunner().invoke(main, ["run", "--url", "http://192.0.2.1:8000", "--rates", "1"])
    assert result.exit_code == 1 and "loopback" in result.output


def test_arrivals_are_poisson_and_bounded_by_count_and_time():
    rng = np.random.default_rng(0)
    times = arrival_times(100.0, 50.0, 1000, rng)
    assert len(times) == 1000 and times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert np.mean(np.diff(times)) == pytest.approx(0.01, rel=0.1)
    assert times.max() < 50.0 and len(arrival_times(100.0, 1.0, 1000, rng)) < 200
