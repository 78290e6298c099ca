"""`benchmarks/serve_overload.py` on a tiny bundle: the client's outcomes against the server's own counts."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pcee.benchmarks.serve_overload import main


def run(bundle, *server_args: str) -> dict:
    arguments = ["--bundle", str(bundle), "--rate", "20", "--duration-s", "1", "--rows-per-request", "2"]
    result = CliRunner().invoke(main, [*arguments, "--json", "--", *server_args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_answered_rows_match_the_servers_and_refusals_are_counted_by_reason(four_layer_bundle):
    held = run(four_layer_bundle)
    assert held["sent"] > 5 and held["outcomes"] == {"200": held["sent"]}
    assert held["answered"]["count"] == held["sent"] and held["refused"]["count"] == 0
    assert held["answered"]["p50_ms"] <= held["answered"]["p99_ms"] <= held["answered"]["max_ms"]
    assert held["server"]["rows_classified"] == held["rows_answered"] == 2 * held["sent"]
    # a deadline shorter than any request takes to be read: every request is refused, none runs
    refused = run(four_layer_bundle, "--max-queue-wait-ms", "0.001")
    assert refused["outcomes"] == {"503": refused["sent"]} and refused["answered"]["count"] == 0
    assert refused["server"]["rows_classified"] == 0 and refused["server"]["queued_rows"] == 0
    assert refused["server"]["dropped"] == {"queue_wait": refused["sent"]}
    assert refused["server"]["answers_within_s"]["+Inf"] == refused["sent"]
