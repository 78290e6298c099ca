"""`pcee-serve --ray`: two Ray Serve replicas of a tiny bundle on a local Ray cluster, HTTP on 127.0.0.1.

Slow-marked: a Ray cluster starts and stops (about 20 s on 2 cores). Ray comes with the dev extra;
without it the tests are skipped. Alone: pip install -e ".[ray]" && python -m pytest -q tests/test_serving_ray.py
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip(
    "ray.serve", reason='Ray Serve is not installed; pip install -e ".[ray]" to run the Ray deployment test'
)

from bundles import SENTENCES  # noqa: E402
from test_serving import assert_same_rows, expected_rows, free_port, probe_ready, start_cli, wait_for  # noqa: E402

from pcee.runtime import EarlyExitRuntime, Manifest, OperatingPoint  # noqa: E402

pytestmark = pytest.mark.slow

DEPLOY_TIMEOUT_S = 180
REPLICAS = 2


@pytest.fixture(scope="module")
def bundle(four_layer_bundle, tmp_path_factory):
    bundle_dir = shutil.copytree(four_layer_bundle, tmp_path_factory.mktemp("ray") / "bundle")
    manifest = Manifest.load(bundle_dir)
    manifest.operating_points.append(OperatingPoint("budgeted", layer=1, name="fast"))
    manifest.save(bundle_dir)
    return bundle_dir


@dataclass
class RayServer:
    url: str
    process: subprocess.Popen
    log_path: Path


@pytest.fixture(scope="module")
def ray_server(bundle, tmp_path_factory):
    """`pcee-serve --ray --replicas 2` as a process; SIGTERM at the end must remove the deployment and exit 0.

    Ray logs a lot: it goes to a file, since a full pipe would block the server.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("ray-log") / "pcee-serve.log"
    command = [
        sys.executable,
        "-m",
        "pcee.serving",
        str(bundle),
        "--port",
        str(port),
        "--model-name",
        "tiny",
        "--ray",
        "--replicas",
        str(REPLICAS),
        "--replica-cpus",
        "0.5",
        "--max-wait-ms",
        "20",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: probe_ready(url) or process.poll() is not None, timeout=DEPLOY_TIMEOUT_S)
        assert process.poll() is None, log_path.read_text()[-3000:]
        yield RayServer(url, process, log_path)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def reference(bundle):
    with EarlyExitRuntime.from_bundle(bundle) as runtime:
        yield runtime


def test_replicas_answer_like_the_in_process_runtime(ray_server, reference):
    requests = [(SENTENCES[i % 12 : i % 12 + 1 + i % 3], "fast" if i % 4 == 0 else None) for i in range(40)]

    def send(request):
        texts, point = request
        body = {"texts": texts} if point is None else {"texts": texts, "operating_point": point}
        reply = httpx.post(ray_server.url + "/v1/classify", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(send, requests))
    for (texts, point), reply in zip(requests, replies):
        assert_same_rows(reply["predictions"], expected_rows(reference, texts, point=point))
        assert reply["operating_point"]["name"] == (point or reference.operating_point.name)
    assert time.monotonic() - started < 60


def test_oip_inference_and_errors_answer_as_in_pcee_serve(ray_server, reference):
    body = {
        "id": "r1",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": SENTENCES[:2]}],
    }
    reply = httpx.post(ray_server.url + "/v2/models/tiny/infer", json=body, timeout=60).json()
    assert reply["id"] == "r1"
    labels = next(output["data"] for output in reply["outputs"] if output["name"] == "label")
    assert labels == [row["label"] for row in expected_rows(reference, SENTENCES[:2])]

    bad = {
        "/v1/classify": (b'{"texts": []}', 400, "empty"),
        "/v2/models/other/infer": (b"{}", 404, "no model named"),
    }
    for path, (content, status, message) in bad.items():
        answer = httpx.post(ray_server.url + path, content=content, timeout=60)
        assert answer.status_code == status and message in answer.json()["error"]
    unknown_point = httpx.post(
        ray_server.url + "/v1/classify", json={"texts": ["fun"], "operating_point": "turbo"}, timeout=60
    )
    assert unknown_point.status_code == 400 and "turbo" in unknown_point.json()["error"]


def test_cli_refuses_a_bad_point_before_starting_ray(bundle):
    process = start_cli(bundle, free_port(), "--ray", "--operating-point", "turbo")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and b"turbo" in stderr


def test_every_route_of_pcee_serve_exists_on_ray(ray_server):
    """One data plane: the replicas serve pcee-serve's own app, so its other routes answer too (issue 17, Ray)."""
    url = ray_server.url
    assert httpx.get(url + "/v2", timeout=60).json()["name"] == "pcee-serve"
    assert (
        httpx.get(url + "/v2/models/tiny/config", timeout=60).json()["input"][0]["data_type"] == "TYPE_STRING"
    )
    assert httpx.get(url + "/v2/models/tiny/versions/1/ready", timeout=60).json() == {
        "name": "tiny",
        "ready": True,
    }
    assert "pcee_requests_total" in httpx.get(url + "/metrics", timeout=60).text
    unknown = httpx.get(url + "/v3/nothing", timeout=60)
    assert unknown.status_code == 404 and "error" in unknown.json()
    echoed = httpx.post(
        url + "/v1/classify", json={"texts": ["fun"]}, headers={"X-Request-ID": "ray-1"}, timeout=60
    )
    assert echoed.headers["x-request-id"] == "ray-1"


def test_sigterm_drains_with_503_not_404(ray_server):
    """During Ray's drain new requests get pcee-serve's JSON 503 with Retry-After, never Ray's 404; exit 0.

    Runs last in this module: it stops the server.
    """
    ray_server.process.send_signal(signal.SIGTERM)
    statuses, refused = [], None
    while ray_server.process.poll() is None:
        try:
            reply = httpx.post(ray_server.url + "/v1/classify", json={"texts": ["late"]}, timeout=10)
        except httpx.TransportError:
            break  # the local cluster is gone, proxy included: nothing listens any more
        statuses.append(reply.status_code)
        if reply.status_code == 503 and refused is None:
            refused = reply
        time.sleep(0.05)
    assert ray_server.process.wait(timeout=60) == 0
    assert 404 not in statuses and set(statuses) <= {200, 503}, statuses
    assert refused is not None, f"no request met the drain: {statuses}"
    assert refused.headers["retry-after"] and "shutting down" in refused.json()["error"]
