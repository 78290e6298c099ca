"""The README's server example is the file docs/examples/server.py, and it serves real requests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bundles import export_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "server.py"


def test_readme_shows_the_example_file_verbatim():
    assert EXAMPLE.read_text() in (ROOT / "README.md").read_text()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture()
def server(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(EXAMPLE), str(export_tiny_bundle(tmp_path)), str(port)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(process.stderr.read().decode())
            time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=10)


def test_server_predicts_switches_and_rejects_bad_input(server):
    status, reply = post(server, "/predict", {"texts": ["the movie was good", "a dull story"]})
    assert status == 200 and len(reply["predictions"]) == 2 and reply["rows"] == 2
    status, reply = post(server, "/operating-point", {"policy": "budgeted", "layer": 1})
    assert status == 200 and reply["layer"] == 1
    status, reply = post(server, "/predict", {"texts": ["good"]})
    assert reply["predictions"][0]["exit_layer"] == 1
    status, reply = post(server, "/predict", {"texts": [""]})
    assert status == 400 and "empty" in reply["error"]
    status, reply = post(server, "/operating-point", {"policy": "pcee"})
    assert status == 400 and "tau" in reply["error"]
