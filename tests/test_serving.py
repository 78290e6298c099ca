"""`pcee-serve` over real tiny bundles and a real uvicorn on a loopback port.

Most tests run uvicorn in a thread of this process (so a test can hold the runtime mid-batch);
the SIGTERM drain and the CLI run it as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from bundles import SENTENCES
from prometheus_client.parser import text_string_to_metric_families

from pcee.runtime import BackendError, EarlyExitRuntime, Manifest, OperatingPoint
from pcee.serving import ServerSettings, create_app
from pcee.serving.connections import ConnectionLimits, uvicorn_options
from pcee.serving.controller import AdaptiveController, ControllerSettings
from pcee.serving.metrics import ServingMetrics

HOST = "127.0.0.1"
MODEL = "tiny"
TOKEN = "s3cret-token"
QUESTIONS = ["who did this", "what a great film", "how was the day"]
ANSWERS = ["the actors did this", "it was a dull story", "the best day"]


# -- servers ---------------------------------------------------------------------------------------
def free_socket() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    return listener


class LiveServer:
    """uvicorn serving `app` in a thread of this process, on a free loopback port."""

    def __init__(self, app, limits: ConnectionLimits | None = None):
        self.app = app
        self.listener = free_socket()
        self.port = self.listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        options = {} if limits is None else uvicorn_options(limits)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.listener]}, daemon=True
        )

    @property
    def service(self):
        return self.app.state.service

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started or (wait_ready and not self.service.ready):
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not come up"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.listener.close()


@contextmanager
def serving(
    bundle: Path, wait_ready: bool = True, load=None, limits: ConnectionLimits | None = None, **settings
):
    settings.setdefault("max_wait_ms", 5.0)
    settings.setdefault("shadow_fraction", 0.0)
    app = create_app(
        ServerSettings(model_name=MODEL, **settings), load or (lambda: EarlyExitRuntime.from_bundle(bundle))
    )
    server = LiveServer(app, limits).start(wait_ready)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bundle(four_layer_bundle, tmp_path_factory):
    """A 4-layer bundle with two extra saved points: "fast" (every row exits at layer 1) and "quality"."""
    bundle_dir = shutil.copytree(four_layer_bundle, tmp_path_factory.mktemp("serve") / "bundle")
    manifest = Manifest.load(bundle_dir)
    manifest.operating_points += [
        OperatingPoint("budgeted", layer=1, name="fast"),
        OperatingPoint("full", name="quality"),
    ]
    manifest.save(bundle_dir)
    return bundle_dir


@pytest.fixture(scope="module")
def reference(bundle):
    with EarlyExitRuntime.from_bundle(bundle) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def server(bundle):
    with serving(bundle, admin_token=TOKEN, max_body_bytes=16_384, body_timeout_s=0.5) as live:
        yield live


@pytest.fixture(scope="module")
def pair_server(pair_bundle):
    with serving(pair_bundle) as live:
        yield live


def post(server: LiveServer, path: str, body, **options) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=20, **options)


def get(server: LiveServer, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=20)


def infer_body(texts: list[str], pairs: list[str] | None = None, **extra) -> dict:
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    if pairs is not None:
        inputs.append({"name": "text_pair", "datatype": "BYTES", "shape": [len(pairs)], "data": pairs})
    return {"inputs": inputs, **extra}


def expected_rows(runtime: EarlyExitRuntime, texts: list[str], pairs=None, point=None) -> list[dict]:
    return [row.to_dict() for row in runtime.predict(texts, pairs, operating_point=point).predictions]


def assert_same_rows(served: list[dict], expected: list[dict]) -> None:
    """Equal up to float noise: a row's probabilities may differ in the 6th decimal with its batch's padding."""
    assert [(row["label"], row["exit_layer"]) for row in served] == [
        (row["label"], row["exit_layer"]) for row in expected
    ]
    np.testing.assert_allclose(
        [row["probabilities"] for row in served], [row["probabilities"] for row in expected], atol=1e-5
    )


def metric_samples(server: LiveServer) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(get(server, "/metrics").text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


# -- the Open Inference Protocol v2 schema (KServe's REST predict v2 spec, as JSON Schema) -----------
PARAMETERS = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
SHAPE = {"type": "array", "items": {"type": "integer"}}
METADATA_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {"name": {"type": "string"}, "datatype": {"enum": DATATYPES}, "shape": SHAPE},
}
OIP_SCHEMAS = {
    "inference_response": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": PARAMETERS,
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "shape", "datatype", "data"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": SHAPE,
                        "datatype": {"enum": DATATYPES},
                        "parameters": PARAMETERS,
                        "data": {"type": "array"},
                    },
                },
            },
        },
    },
    "metadata_model_response": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": METADATA_TENSOR},
            "outputs": {"type": "array", "items": METADATA_TENSOR},
        },
    },
    "error_response": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "live_response": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "ready_response": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
}


def conforms(payload: dict, schema: str) -> None:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema (in the dev extra) checks the OIP v2 shapes"
    )
    jsonschema.validate(payload, OIP_SCHEMAS[schema])


# -- endpoints -------------------------------------------------------------------------------------
def test_health_and_model_metadata(server):
    conforms(get(server, "/v2/health/live").json(), "live_response")
    ready = get(server, "/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    metadata = get(server, f"/v2/models/{MODEL}").json()
    conforms(metadata, "metadata_model_response")
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["text"]
    assert metadata["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
    assert get(server, f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    unknown = get(server, "/v2/models/other/ready")
    assert unknown.status_code == 404 and "'tiny'" in unknown.json()["error"]


def test_infer_answers_in_oip_v2_shapes_with_the_runtime_results(server, reference):
    texts = SENTENCES[:3]
    response = post(server, f"/v2/models/{MODEL}/infer", infer_body(texts, id="req-7"))
    assert response.status_code == 200
    reply = response.json()
    conforms(reply, "inference_response")
    outputs = {output["name"]: output for output in reply["outputs"]}
    expected = reference.predict(texts).predictions
    assert reply["id"] == "req-7" and reply["model_name"] == MODEL
    assert reply["parameters"]["operating_point"] == "default"
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [3],
        "data": [row.label for row in expected],
    }
    assert outputs["exit_layer"] == {
        "name": "exit_layer",
        "datatype": "INT32",
        "shape": [3],
        "data": [row.exit_layer for row in expected],
    }
    assert outputs["probabilities"]["shape"] == [3, 2] and outputs["probabilities"]["datatype"] == "FP32"
    np.testing.assert_allclose(
        outputs["probabilities"]["data"], np.concatenate([row.probabilities for row in expected]), atol=1e-6
    )


def test_infer_parameters_pick_a_saved_point_and_outputs_select_tensors(server):
    body = infer_body(SENTENCES[:4], parameters={"operating_point": "fast"}, outputs=[{"name": "exit_layer"}])
    reply = post(server, f"/v2/models/{MODEL}/infer", body).json()
    assert reply["parameters"]["operating_point"] == "fast"
    assert reply["outputs"] == [
        {"name": "exit_layer", "datatype": "INT32", "shape": [4], "data": [1, 1, 1, 1]}
    ]


def test_infer_takes_texts_shaped_rows_by_1_as_triton_batched_models_declare(server, pair_server):
    """[N, 1] inputs (pcee-triton's and any Triton model's with max_batch_size > 0), data flat or one
    list per row: the rows of the [N] form, with per-row outputs shaped [N, 1] likewise."""
    texts = SENTENCES[:3]
    flat = post(server, f"/v2/models/{MODEL}/infer", infer_body(texts)).json()
    for data in (texts, [[text] for text in texts]):
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3, 1], "data": data}]}
        reply = post(server, f"/v2/models/{MODEL}/infer", body)
        assert reply.status_code == 200, reply.text
        outputs = {output["name"]: output for output in reply.json()["outputs"]}
        assert outputs["label"]["shape"] == [3, 1] and outputs["exit_layer"]["shape"] == [3, 1]
        assert outputs["probabilities"]["shape"] == [3, 2]
        assert [output["data"] for output in reply.json()["outputs"]] == [
            output["data"] for output in flat["outputs"]
        ]
    pairs = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": SENTENCES[:2]},
            {"name": "text_pair", "datatype": "BYTES", "shape": [2, 1], "data": SENTENCES[2:4]},
        ]
    }
    assert post(pair_server, f"/v2/models/{MODEL}/infer", pairs).status_code == 200
    for shape in ([3, 2], [1, 3], [3, 1, 1]):
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": texts}]}
        refused = post(server, f"/v2/models/{MODEL}/infer", body)
        assert refused.status_code == 400 and "must be [3] or [3, 1]" in refused.json()["error"]
    declared = get(server, f"/v2/models/{MODEL}").json()["inputs"][0]["shape"]
    assert declared == [-1] and get(server, f"/v2/models/{MODEL}/config").json()["input"][0]["dims"] == [-1]


def test_classify_returns_the_rows_of_pcee_predict(server, reference):
    reply = post(server, "/v1/classify", {"texts": SENTENCES[:5]}).json()
    assert_same_rows(reply["predictions"], expected_rows(reference, SENTENCES[:5]))
    assert reply["operating_point"] == reference.operating_point.to_dict()
    reply = post(server, "/v1/classify", {"texts": SENTENCES[:2], "operating_point": "quality"}).json()
    assert [row["exit_layer"] for row in reply["predictions"]] == [4, 4] and reply["layer_speedup"] == 0.0


def test_pair_bundle_takes_text_pairs(pair_server, pair_bundle):
    with EarlyExitRuntime.from_bundle(pair_bundle) as runtime:
        expected = expected_rows(runtime, QUESTIONS, ANSWERS)
    reply = post(pair_server, "/v1/classify", {"texts": QUESTIONS, "text_pairs": ANSWERS}).json()
    assert_same_rows(reply["predictions"], expected)
    reply = post(pair_server, f"/v2/models/{MODEL}/infer", infer_body(QUESTIONS, ANSWERS)).json()
    assert reply["outputs"][0]["data"] == [row["label"] for row in expected]
    missing = post(pair_server, "/v1/classify", {"texts": QUESTIONS})
    assert missing.status_code == 400 and "text_pairs" in missing.json()["error"]
    missing = post(pair_server, f"/v2/models/{MODEL}/infer", infer_body(QUESTIONS))
    assert missing.status_code == 400 and "text_pair" in missing.json()["error"]


def test_concurrent_requests_each_get_their_own_rows(server, reference):
    """50 requests from 16 threads, mixed sizes and points, batched together: each equals a lone runtime call."""
    requests = [(SENTENCES[i % 12 : i % 12 + 1 + i % 3], "fast" if i % 4 == 0 else None) for i in range(50)]
    before = metric_samples(server).get(("pcee_batch_rows_count", ()), 0.0)

    def send(request):
        texts, point = request
        body = {"texts": texts} if point is None else {"texts": texts, "operating_point": point}
        return post(server, "/v1/classify", body).json()["predictions"]

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(send, requests))
    for (texts, point), reply in zip(requests, replies):
        assert_same_rows(reply, expected_rows(reference, texts, point=point))
    batches = metric_samples(server)[("pcee_batch_rows_count", ())] - before
    assert batches < len(requests), "no two requests ever shared a runtime call"


def test_a_bad_row_fails_only_its_own_request(server):
    bodies = [{"texts": ["good fun"]}, {"texts": ["   "]}, {"texts": ["a dull story"]}] * 3
    with ThreadPoolExecutor(9) as pool:
        statuses = list(pool.map(lambda body: post(server, "/v1/classify", body).status_code, bodies))
    assert statuses == [200, 400, 200] * 3


BAD_REQUESTS = {
    "not json": ("/v1/classify", b"{texts: oops", "not valid JSON"),
    "empty body": ("/v1/classify", b"", "empty"),
    "not utf-8": ("/v1/classify", b'{"texts": ["\xff\xfe"]}', "UTF-8"),
    "too deep": ("/v1/classify", b"[" * 5000 + b"]" * 5000, "too deeply"),
    "a list body": ("/v1/classify", b'["a"]', "JSON object"),
    "texts a string": ("/v1/classify", b'{"texts": "good"}', "array of strings"),
    "a number text": ("/v1/classify", b'{"texts": ["good", 3]}', "texts[1]"),
    "empty list": ("/v1/classify", b'{"texts": []}', "empty"),
    "no texts": ("/v1/classify", b'{"text": ["good"]}', "unknown fields"),
    "lone surrogate": ("/v1/classify", b'{"texts": ["good \\ud800"]}', "surrogate"),
    "blank text": ("/v1/classify", b'{"texts": [" "]}', "whitespace"),
    "unknown point": ("/v1/classify", b'{"texts": ["good"], "operating_point": "turbo"}', "turbo"),
    "point object": (
        "/v1/classify",
        b'{"texts": ["good"], "operating_point": {"policy": "full"}}',
        "saved operating point",
    ),
    "pairs for a single-sentence model": (
        "/v1/classify",
        b'{"texts": ["good"], "text_pairs": ["bad"]}',
        "single sentences",
    ),
    "oip no inputs": (f"/v2/models/{MODEL}/infer", b'{"outputs": []}', '"inputs"'),
    "oip wrong datatype": (
        f"/v2/models/{MODEL}/infer",
        b'{"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": ["a"]}]}',
        "BYTES",
    ),
    "oip wrong shape": (
        f"/v2/models/{MODEL}/infer",
        b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}',
        "shape",
    ),
    "oip unknown input": (
        f"/v2/models/{MODEL}/infer",
        b'{"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
        "txt",
    ),
    "oip unknown output": (
        f"/v2/models/{MODEL}/infer",
        json.dumps(infer_body(["a"], outputs=[{"name": "logits"}])).encode(),
        "logits",
    ),
    "oip id lone surrogate": (
        f"/v2/models/{MODEL}/infer",
        b'{"id": "r\\ud800", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
        "surrogate",
    ),
    "point lone surrogate": (
        "/v1/classify",
        b'{"texts": ["good"], "operating_point": "\\udfff"}',
        "surrogate",
    ),
    "a 5000-digit integer": ("/v1/classify", b'{"texts": ["good"], "n": ' + b"7" * 5000 + b"}", "digits"),
    "oip timeout a string": (
        f"/v2/models/{MODEL}/infer",
        json.dumps(infer_body(["a"], parameters={"timeout": "soon"})).encode(),
        "microseconds",
    ),
    "oip point a number": (
        f"/v2/models/{MODEL}/infer",
        json.dumps(infer_body(["a"], parameters={"operating_point": 3})).encode(),
        "operating_point",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_each_bad_request_gets_a_400_naming_the_problem(server, case):
    path, body, named = BAD_REQUESTS[case]
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    conforms(response.json(), "error_response")
    assert named in response.json()["error"]


def test_unknown_routes_and_methods_answer_json(server):
    assert get(server, "/v3/nothing").status_code == 404 and "error" in get(server, "/v3/nothing").json()
    wrong_method = get(server, "/v1/classify")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_binary_tensor_extension_is_refused_with_a_hint(server):
    response = post(
        server,
        f"/v2/models/{MODEL}/infer",
        infer_body(["good"]),
        headers={"Inference-Header-Content-Length": "60"},
    )
    assert response.status_code == 400 and "binary_data=False" in response.json()["error"]
    body = json.dumps(infer_body(["good"])).encode()
    all_json = post(
        server, f"/v2/models/{MODEL}/infer", body, headers={"Inference-Header-Content-Length": str(len(body))}
    )
    assert all_json.status_code == 200, (
        "the header's length is the whole body: no binary part (Triton's C++ clients)"
    )


def failing_runtime(bundle: Path) -> EarlyExitRuntime:
    """A runtime whose backend fails on a batch of 3 rows, and which has a bug on a batch of 5 (after warm-up)."""
    runtime = EarlyExitRuntime.from_bundle(bundle)
    predict_encoded = runtime.predict_encoded

    def failing_predict(rows, *args, **options):
        if len(rows) == 3:
            raise BackendError("cudaMemcpyAsync failed: device lost")
        if len(rows) == 5:
            raise RuntimeError("a bug")
        return predict_encoded(rows, *args, **options)

    runtime.predict_encoded = failing_predict
    return runtime


def test_failures_inside_the_server_answer_500_json(bundle):
    with serving(bundle, load=lambda: failing_runtime(bundle)) as live:
        backend = post(live, "/v1/classify", {"texts": SENTENCES[:3]})
        assert backend.status_code == 500 and "device lost" in backend.json()["error"]
        bug = post(live, "/v1/classify", {"texts": SENTENCES[:5]})
        assert bug.status_code == 500 and "server log" in bug.json()["error"]
        assert post(live, "/v1/classify", {"texts": ["good"]}).status_code == 200


def test_bodies_over_the_limit_get_413(server):
    declared = post(server, "/v1/classify", b"x" * 20_000)
    assert declared.status_code == 413 and "--max-body-bytes" in declared.json()["error"]
    chunked = httpx.post(server.url + "/v1/classify", content=iter([b"x" * 10_000] * 3), timeout=20)
    assert chunked.status_code == 413


def test_a_stalled_body_is_timed_out_with_408(server):
    """Headers promise 100 bytes, 10 arrive, then nothing: the server answers (JSON 408) instead of waiting forever."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection((HOST, port), timeout=10) as client:
        client.sendall(
            b'POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"texts": '
        )
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = client.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in reply
    assert time.monotonic() - started < 5


def test_metrics_follow_prometheus_naming(server):
    post(server, "/v1/classify", {"texts": SENTENCES[:3]})
    samples = metric_samples(server)
    names = {name for name, _ in samples}
    for name in (
        "pcee_request_duration_seconds_bucket",
        "pcee_queue_wait_seconds_count",
        "pcee_batch_rows_bucket",
        "pcee_batch_duration_seconds_sum",
        "pcee_layers_run_total",
        "pcee_layers_possible_total",
        "pcee_queue_rows",
    ):
        assert name in names
    assert samples[("pcee_requests_total", (("route", "classify"), ("status", "200")))] >= 1
    assert samples[("pcee_ready", ())] == 1.0
    exit_rows = sum(value for (name, labels), value in samples.items() if name == "pcee_rows_total")
    assert exit_rows * 4 == samples[("pcee_layers_possible_total", ())]
    assert any(
        name == "pcee_operating_point_info" and ("name", "default") in labels for name, labels in samples
    )


# -- admin -----------------------------------------------------------------------------------------
def test_admin_switches_the_point_only_with_the_token(bundle):
    with serving(bundle, admin_token=TOKEN) as live:
        point = {"operating_point": "fast"}
        missing = httpx.put(live.url + "/v1/operating-point", json=point)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        wrong = httpx.put(
            live.url + "/v1/operating-point", json=point, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        switched = httpx.put(live.url + "/v1/operating-point", json=point, headers=authorized)
        assert switched.status_code == 200 and switched.json()["operating_point"]["name"] == "fast"
        reply = post(live, "/v1/classify", {"texts": SENTENCES[:3]}).json()
        assert [row["exit_layer"] for row in reply["predictions"]] == [1, 1, 1]
        by_object = httpx.put(
            live.url + "/v1/operating-point",
            json={"operating_point": {"policy": "budgeted", "layer": 2}},
            headers=authorized,
        )
        assert by_object.status_code == 200 and by_object.json()["operating_point"]["layer"] == 2
        invalid = httpx.put(
            live.url + "/v1/operating-point", json={"operating_point": {"policy": "pcee"}}, headers=authorized
        )
        assert invalid.status_code == 400 and "tau" in invalid.json()["error"]
        samples = metric_samples(live)
        assert samples[("pcee_operating_point_switches_total", (("source", "admin"),))] == 2
        assert any(
            name == "pcee_operating_point_info" and ("layer", "2") in labels for name, labels in samples
        )


def test_admin_is_off_without_a_token(pair_server):
    response = httpx.put(
        pair_server.url + "/v1/operating-point",
        json={"operating_point": "default"},
        headers={"Authorization": "Bearer x"},
    )
    assert response.status_code == 404 and "PCEE_ADMIN_TOKEN" in response.json()["error"]


# -- load, backpressure, life cycle ----------------------------------------------------------------
class HeldRuntime:
    """Loads the bundle, then (once `hold()` is called) makes every predict wait for `release()`."""

    def __init__(self, bundle: Path, seconds_per_call: float = 0.0):
        self.bundle = bundle
        self.seconds_per_call = seconds_per_call
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self) -> EarlyExitRuntime:
        runtime = EarlyExitRuntime.from_bundle(self.bundle)
        predict_encoded = runtime.predict_encoded

        def held_predict(*args, **kwargs):
            self.entered.set()
            assert self.gate.wait(timeout=20), "the test never released the runtime"
            time.sleep(self.seconds_per_call)
            return predict_encoded(*args, **kwargs)

        runtime.predict_encoded = held_predict
        return runtime

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()


def test_past_max_queue_requests_get_503_and_health_answers_during_a_batch(bundle):
    held = HeldRuntime(bundle)
    with serving(bundle, load=held, max_queue=4, max_batch_size=2) as live, ThreadPoolExecutor(4) as pool:
        held.hold()
        running = pool.submit(post, live, "/v1/classify", {"texts": SENTENCES[:2]})
        assert held.entered.wait(10)
        assert get(live, "/v2/health/live").status_code == 200 and get(live, "/metrics").status_code == 200
        queued = [pool.submit(post, live, "/v1/classify", {"texts": SENTENCES[2:4]}) for _ in range(2)]
        wait_for(lambda: live.service.batcher.queued_rows == 4)
        refused = post(live, "/v1/classify", {"texts": ["one more"]})
        assert (
            refused.status_code == 503
            and refused.headers["retry-after"] == "1"
            and "--max-queue" in refused.json()["error"]
        )
        too_big = post(live, "/v1/classify", {"texts": SENTENCES[:5]})
        assert too_big.status_code == 413
        held.gate.set()
        assert [future.result().status_code for future in [running, *queued]] == [200, 200, 200]
        assert metric_samples(live)[("pcee_requests_total", (("route", "classify"), ("status", "503")))] == 1


def test_not_ready_until_loaded_and_warmed_up(bundle):
    loaded = threading.Event()

    def slow_load():
        assert loaded.wait(20)
        return EarlyExitRuntime.from_bundle(bundle)

    with serving(bundle, load=slow_load, wait_ready=False) as live:
        assert get(live, "/v2/health/live").status_code == 200
        assert get(live, "/v2/health/ready").json() == {"ready": False, "reason": "the model is loading"}
        early = post(live, "/v1/classify", {"texts": ["good"]})
        assert early.status_code == 503 and "retry-after" in early.headers
        loaded.set()
        wait_for(lambda: get(live, "/v2/health/ready").status_code == 200)
        assert post(live, "/v1/classify", {"texts": ["good"]}).status_code == 200


def test_tritonclient_speaks_to_the_server(server, reference):
    """A client nobody here wrote: NVIDIA's tritonclient, over HTTP with JSON tensors."""
    triton = pytest.importorskip(
        "tritonclient.http", reason="tritonclient[http] (in the dev extra) is the independent OIP v2 client"
    )
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_model_metadata(MODEL)["platform"] == "pcee-early-exit"
    texts = SENTENCES[:3]
    text = triton.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array(texts, dtype=object), binary_data=False)
    outputs = [
        triton.InferRequestedOutput(name, binary_data=False)
        for name in ("label", "probabilities", "exit_layer")
    ]
    result = client.infer(MODEL, [text], outputs=outputs, parameters={"operating_point": "quality"})
    expected = reference.predict(texts, operating_point="quality").predictions
    assert [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")] == [
        row.label for row in expected
    ]
    assert result.as_numpy("exit_layer").tolist() == [4, 4, 4]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), np.stack([row.probabilities for row in expected]), atol=1e-6
    )
    with pytest.raises(triton.InferenceServerException, match="no model named"):
        client.infer("other", [text])
    client.close()


# -- adaptive operating point and drift watch -------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_controller_hysteresis_and_dwell():
    """Target 100 ms: step down past 90 ms, up under 50 ms, stay in between, never twice within the dwell."""
    clock, switched = FakeClock(), []
    settings = ControllerSettings(
        slo_p99_ms=100, points=("quality", "mid", "fast"), dwell_s=5, window_s=10, min_samples=5
    )
    controller = AdaptiveController(
        settings, switched.append, lambda: 0.0, ServingMetrics(max_batch_size=8), clock
    )

    def spell(latency: float, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            clock.now += 0.1
            controller.observe(latency)
            controller.step()

    spell(0.2, 4.0)
    assert switched == []  # within the first dwell
    spell(0.2, 1.5)
    assert switched == ["mid"]
    spell(0.2, 3.0)
    assert switched == ["mid"]  # dwell after the switch
    spell(0.2, 3.0)
    assert switched == ["mid", "fast"]
    spell(0.2, 10.0)
    assert switched == ["mid", "fast"]  # nothing faster to go to
    spell(0.07, 20.0)
    assert switched == ["mid", "fast"]  # inside the hysteresis band: stay
    spell(0.03, 9.0)
    assert switched == ["mid", "fast"]  # the 10 s window still holds the 70 ms spell
    spell(0.03, 3.0)
    assert switched == ["mid", "fast", "mid"]


class PointCost:
    """A runtime whose most accurate point costs `seconds` per call: a load it cannot hold at that point."""

    def __init__(self, bundle: Path, slow_point: str, seconds: float):
        self.bundle, self.slow_point, self.seconds = bundle, slow_point, seconds

    def __call__(self) -> EarlyExitRuntime:
        runtime = EarlyExitRuntime.from_bundle(self.bundle)
        predict_encoded = runtime.predict_encoded

        def costly_predict(rows, operating_point=None, *args, **options):
            if getattr(operating_point, "name", None) == self.slow_point:
                time.sleep(self.seconds)
            return predict_encoded(rows, operating_point, *args, **options)

        runtime.predict_encoded = costly_predict
        return runtime


def test_controller_steps_down_under_load_and_back_up_after(bundle):
    ladder = ControllerSettings(
        slo_p99_ms=40, points=("quality", "fast"), dwell_s=0.3, window_s=1.0, min_samples=10
    )
    with serving(
        bundle, load=PointCost(bundle, "quality", 0.08), controller=ladder, admin_token=TOKEN
    ) as live:
        assert live.service.runtime.operating_point.name == "quality"
        loaded = threading.Event()

        def client() -> None:
            while not loaded.is_set():
                post(live, "/v1/classify", {"texts": ["good fun"]})

        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(client)
            wait_for(lambda: live.service.runtime.operating_point.name == "fast", timeout=15)
            loaded.set()
        wait_for(lambda: live.service.runtime.operating_point.name == "quality", timeout=15)
        samples = metric_samples(live)
        assert samples[("pcee_operating_point_switches_total", (("source", "controller"),))] >= 2
        assert ("pcee_adaptive_level", ()) in samples
        refused = httpx.put(
            live.url + "/v1/operating-point",
            json={"operating_point": "fast"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert refused.status_code == 409 and "adaptive" in refused.json()["error"]


def test_shadow_rows_measure_agreement_with_the_full_model(bundle):
    with serving(bundle, shadow_fraction=1.0) as live:
        post(live, "/v1/classify", {"texts": SENTENCES[:3], "operating_point": "quality"})
        wait_for(lambda: metric_samples(live).get(("pcee_shadow_rows_total", ()), 0) == 3)
        assert metric_samples(live)[("pcee_shadow_agreement", ())] == 1.0
        post(live, "/v1/classify", {"texts": SENTENCES, "operating_point": "fast"})
        wait_for(lambda: metric_samples(live)[("pcee_shadow_rows_total", ())] == 3 + len(SENTENCES))
        samples = metric_samples(live)
        assert 0.0 <= samples[("pcee_shadow_agreement", ())] <= 1.0
        assert samples[("pcee_shadow_agreed_rows_total", ())] <= samples[("pcee_shadow_rows_total", ())]


# -- the CLI, as a process ---------------------------------------------------------------------------
def start_cli(
    bundle: Path, port: int, *options: str, env: dict | None = None, launcher: tuple = ("-m", "pcee.serving")
) -> subprocess.Popen:
    """pcee-serve as a process; `launcher` is what python runs (the module, or `-c` and a script that wraps it)."""
    return subprocess.Popen(
        [
            sys.executable,
            *launcher,
            str(bundle),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *options,
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def free_port() -> int:
    with free_socket() as probe:
        return probe.getsockname()[1]


def test_sigterm_drains_admitted_requests_and_exits_0(bundle):
    port = free_port()
    url = f"http://{HOST}:{port}"
    process = start_cli(
        bundle,
        port,
        env={"PCEE_MAX_WAIT_MS": "5000", "PCEE_MAX_BATCH_SIZE": "64", "PCEE_MODEL_NAME": "drained"},
    )
    try:
        wait_for(lambda: probe_ready(url) or process.poll() is not None, timeout=60)
        assert process.poll() is None, process.stderr.read().decode()
        with ThreadPoolExecutor(4) as pool:
            admitted = [
                pool.submit(httpx.post, url + "/v1/classify", json={"texts": [text]}, timeout=30)
                for text in SENTENCES[:4]
            ]
            wait_for(lambda: "pcee_queue_rows 4.0" in httpx.get(url + "/metrics").text)
            process.send_signal(signal.SIGTERM)
            assert [future.result().status_code for future in admitted] == [200] * 4
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def probe_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_cli_exits_1_when_the_bundle_cannot_be_served(bundle):
    process = start_cli(bundle, free_port(), "--operating-point", "turbo")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and b"turbo" in stderr


# -- faults: a deep queue at SIGTERM, deadlines, departed clients ------------------------------------
SLOW_SERVER = """
import time
from pcee.runtime import EarlyExitRuntime
from pcee.serving.cli import main

predict_encoded = EarlyExitRuntime.predict_encoded

def slow_predict_encoded(self, rows, *args, **options):
    time.sleep({seconds})
    return predict_encoded(self, rows, *args, **options)

EarlyExitRuntime.predict_encoded = slow_predict_encoded
main(prog_name="pcee-serve")
"""


def start_slow_cli(bundle: Path, port: int, seconds_per_batch: float, *options: str) -> subprocess.Popen:
    """pcee-serve itself, in a process whose runtime takes `seconds_per_batch` longer per batch: a deep queue on demand."""
    launcher = ("-c", SLOW_SERVER.format(seconds=seconds_per_batch))
    return start_cli(bundle, port, "--shadow-fraction", "0", *options, launcher=launcher)


async def send_all(url: str, bodies: list[dict], on_sent=None) -> list[str]:
    """Every body at once, each on its own connection; each outcome as 'STATUS' (JSON answers) or the transport error."""
    import asyncio

    async def send(client, body) -> str:
        try:
            reply = await client.post(url + "/v1/classify", json=body, timeout=60)
        except httpx.TransportError as error:
            return type(error).__name__
        try:
            reply.json()
        except ValueError:
            return f"{reply.status_code} not JSON"
        return str(reply.status_code)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(bodies) + 8)) as client:
        tasks = [asyncio.create_task(send(client, body)) for body in bodies]
        if on_sent is not None:
            await on_sent(client)
        return list(await asyncio.gather(*tasks))


def test_sigterm_with_a_deep_queue_answers_everyone_and_exits_within_the_drain_timeout(bundle):
    """Hundreds of queued rows, a 2 s drain: every admitted request gets 200 or a JSON 503, new ones get
    503 + Retry-After while the drain runs, and the process exits 0 within the timeout (issue 17, defect 1)."""
    import asyncio

    port, drain_timeout = free_port(), 2.0
    url = f"http://{HOST}:{port}"
    process = start_slow_cli(
        bundle,
        port,
        0.2,
        "--max-batch-size",
        "4",
        "--max-wait-ms",
        "0",
        "--drain-timeout-s",
        str(drain_timeout),
        "--max-queue-wait-ms",
        "600000",
    )
    late = {}
    exited = threading.Thread(target=lambda: (process.wait(), late.setdefault("exited", time.monotonic())))
    exited.start()  # the exit time the server keeps, however slowly the loaded client reads its answers

    async def signal_when_deep(client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 60
        while "pcee_queue_rows" not in late:
            metrics = (await client.get(url + "/metrics")).text
            rows = next(
                float(line.split()[1]) for line in metrics.splitlines() if line.startswith("pcee_queue_rows ")
            )
            if rows >= 300:
                late["pcee_queue_rows"] = rows
            assert time.monotonic() < deadline, "the queue never got deep"
            await asyncio.sleep(0.02)
        late["signalled"] = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        late["refused"] = await client.post(url + "/v1/classify", json={"texts": ["late"]})
        late["ready"] = await client.get(url + "/v2/health/ready")

    try:
        wait_for(lambda: probe_ready(url) or process.poll() is not None, timeout=60)
        assert process.poll() is None, process.stderr.read().decode()
        outcomes = asyncio.run(send_all(url, [{"texts": SENTENCES[:2]}] * 300, signal_when_deep))
        exit_code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        exited.join()
    took = late["exited"] - late["signalled"]
    assert set(outcomes) <= {"200", "503"}, sorted(set(outcomes))
    assert outcomes.count("200") > 0 and outcomes.count("503") > 0, "the drain should have had to refuse some"
    refused = late["refused"]
    assert (
        refused.status_code == 503
        and refused.headers["retry-after"]
        and "shutting down" in refused.json()["error"]
    )
    assert (
        late["ready"].status_code == 503 and late["ready"].json()["reason"] == "the server is shutting down"
    )
    assert exit_code == 0
    assert took < drain_timeout + 0.5, (
        f"exited {took:.2f} s after SIGTERM; the drain timeout is {drain_timeout} s"
    )


def dropped(live: LiveServer, reason: str) -> float:
    return metric_samples(live).get(("pcee_requests_dropped_total", (("reason", reason),)), 0.0)


def rows_classified(live: LiveServer) -> float:
    return sum(value for (name, _), value in metric_samples(live).items() if name == "pcee_rows_total")


def test_queue_and_request_deadlines_answer_without_running(bundle):
    """Behind a held batch: past --max-queue-wait-ms 503, past the request's own timeout (header or OIP
    `timeout` in microseconds) 504, none of them run, each counted by reason (issue 17, defect 2)."""
    held = HeldRuntime(bundle)
    with serving(bundle, load=held, max_queue_wait_ms=300) as live, ThreadPoolExecutor(4) as pool:
        held.hold()
        running = pool.submit(post, live, "/v1/classify", {"texts": SENTENCES[:1]})
        assert held.entered.wait(10)
        started = time.monotonic()
        queued = post(live, "/v1/classify", {"texts": ["waits too long"]})
        assert queued.status_code == 503 and queued.headers["retry-after"] == "1"
        assert "--max-queue-wait-ms" in queued.json()["error"] and 0.25 < time.monotonic() - started < 3
        by_header = post(
            live, "/v1/classify", {"texts": ["in a hurry"]}, headers={"X-Request-Timeout-Ms": "50"}
        )
        assert by_header.status_code == 504 and "50 ms" in by_header.json()["error"]
        by_parameter = post(
            live, f"/v2/models/{MODEL}/infer", infer_body(["in a hurry"], parameters={"timeout": 50_000})
        )
        assert by_parameter.status_code == 504 and "nothing ran" in by_parameter.json()["error"]
        for bad in ("soon", "-1", "nan"):
            refused = post(live, "/v1/classify", {"texts": ["x"]}, headers={"X-Request-Timeout-Ms": bad})
            assert refused.status_code == 400 and "X-Request-Timeout-Ms" in refused.json()["error"]
        held.gate.set()
        assert running.result().status_code == 200
        assert dropped(live, "queue_wait") == 1 and dropped(live, "request_timeout") == 2
        assert rows_classified(live) == 1, "only the held request's row ran"
        assert live.service.batcher.queued_rows == 0


def test_a_request_the_queue_ahead_would_keep_past_its_deadline_is_refused_at_once(bundle):
    """Rows queued ahead x the recent seconds per row past the deadline: a fast 503 (or 504 for the
    request's own timeout) at admission, instead of a slow one when the deadline passes in the queue."""
    held = HeldRuntime(bundle, seconds_per_call=0.5)
    with (
        serving(bundle, load=held, max_batch_size=1, max_wait_ms=0, max_queue_wait_ms=2000) as live,
        ThreadPoolExecutor(6) as pool,
    ):
        assert post(live, "/v1/classify", {"texts": ["learn the pace"]}).status_code == 200
        held.hold()
        running = [pool.submit(post, live, "/v1/classify", {"texts": ["running"]})]
        assert held.entered.wait(10)
        for expected_rows in (1, 2, 3):  # about 0.5 s ahead of the next one for each
            running.append(pool.submit(post, live, "/v1/classify", {"texts": ["queued"]}))
            wait_for(lambda rows=expected_rows: live.service.batcher.queued_rows == rows)
        started = time.monotonic()
        hurried = post(live, "/v1/classify", {"texts": ["x"]}, headers={"X-Request-Timeout-Ms": "1000"})
        assert hurried.status_code == 504 and "would pass before" in hurried.json()["error"]
        running.append(pool.submit(post, live, "/v1/classify", {"texts": ["fits, 1.5 s ahead"]}))
        wait_for(lambda: live.service.batcher.queued_rows == 4)
        refused = post(live, "/v1/classify", {"texts": ["2 s ahead"]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert (
            "would not start" in refused.json()["error"] and "--max-queue-wait-ms" in refused.json()["error"]
        )
        assert time.monotonic() - started < 1.0, "both were refused at once, not when their deadlines passed"
        held.gate.set()
        statuses = [future.result().status_code for future in running]
        assert statuses[:4] == [200] * 4 and statuses[4] in (200, 503)
        assert rows_classified(live) == 1 + statuses.count(200), "the refused requests never ran"
        assert dropped(live, "request_timeout") == 1
        assert dropped(live, "queue_wait") == 1 + statuses.count(503)


def test_a_departed_clients_request_is_dropped_before_it_runs(bundle):
    held = HeldRuntime(bundle)
    port = None
    with serving(bundle, load=held) as live, ThreadPoolExecutor(2) as pool:
        port = int(live.url.rsplit(":", 1)[1])
        held.hold()
        running = pool.submit(post, live, "/v1/classify", {"texts": SENTENCES[:1]})
        assert held.entered.wait(10)
        body = json.dumps({"texts": SENTENCES[:3]}).encode()
        with socket.create_connection((HOST, port), timeout=10) as client:
            client.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_for(lambda: live.service.batcher.queued_rows == 3)
        wait_for(lambda: dropped(live, "client_disconnected") == 1)
        assert live.service.batcher.queued_rows == 0
        held.gate.set()
        assert running.result().status_code == 200
        assert rows_classified(live) == 1, "the departed client's 3 rows never ran"


def send_slowly(port: int, parts: list[bytes], pause_s: float) -> bytes:
    """One request sent in `parts`, `pause_s` apart, on a fresh connection; its reply (the server closes or answers)."""
    reply = b""
    with socket.create_connection((HOST, port), timeout=10) as client:
        for index, part in enumerate(parts):
            if index:
                time.sleep(pause_s)
            client.sendall(part)
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < content_length(reply):
            chunk = client.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def classify_request(texts: list[str], *headers: str) -> bytes:
    body = json.dumps({"texts": texts}).encode()
    head = ["POST /v1/classify HTTP/1.1", "Host: x", "Content-Type: application/json", *headers]
    return ("\r\n".join([*head, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode() + body


def test_deadlines_count_from_the_first_bytes_of_the_request(bundle):
    """The queue deadline and the request's own timeout run from when the request's first bytes reached
    the connection layer, not from admission: a request whose head or body took longer than its deadline
    to arrive is answered at once without running, on an idle server (issue 17, overload)."""
    with serving(bundle, limits=ConnectionLimits(), max_queue_wait_ms=400) as live:
        request = classify_request(SENTENCES[:2])
        on_time = send_slowly(live.port, [request[:20], request[20:]], pause_s=0.05)
        assert on_time.startswith(b"HTTP/1.1 200"), on_time[:300]
        head, body = request.split(b"\r\n\r\n", 1)
        late_body = send_slowly(live.port, [head + b"\r\n\r\n", body], pause_s=0.6)
        assert late_body.startswith(b"HTTP/1.1 503") and "of its arrival" in json_error(late_body)
        late_head = send_slowly(live.port, [request[:10], request[10:]], pause_s=0.6)
        assert late_head.startswith(b"HTTP/1.1 503")
        hurried = classify_request(SENTENCES[:2], "X-Request-Timeout-Ms: 150")
        timed_out = send_slowly(live.port, [hurried[:30], hurried[30:]], pause_s=0.3)
        assert timed_out.startswith(b"HTTP/1.1 504") and "150 ms from its arrival" in json_error(timed_out)
        assert dropped(live, "queue_wait") == 2 and dropped(live, "request_timeout") == 1
        assert rows_classified(live) == 2, "only the request that arrived in time ran"


# -- the connection layer: head size, head and idle timeouts, connection limit, protocol errors ----
GUARDED = ConnectionLimits(
    max_header_bytes=8192, header_timeout_s=0.5, keep_alive_timeout_s=0.5, max_connections=50
)


@pytest.fixture(scope="module")
def guarded(bundle):
    with serving(bundle, limits=GUARDED) as live:
        yield live


def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send `request` on a fresh connection and read until the server closes it (a reset reads as the end)."""
    reply = b""
    with socket.create_connection((HOST, port), timeout=timeout) as client:
        try:
            client.sendall(request)
        except OSError:  # the server closed mid-send: what it wrote before is still readable
            pass
        try:
            while chunk := client.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


def json_error(reply: bytes) -> str:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), reply[:300]
    return json.loads(body)["error"]


def test_a_huge_header_gets_431_or_a_closed_connection_never_200(guarded):
    """One 1 MB header (issue 17, defect 4): refused once the head passes --max-header-bytes."""
    reply = exchange(
        guarded.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    )
    assert not reply.startswith(b"HTTP/1.1 200")
    if reply:
        assert reply.startswith(b"HTTP/1.1 431") and "--max-header-bytes" in json_error(reply)
    huge_line = exchange(guarded.port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert huge_line.startswith(b"HTTP/1.1 431")
    assert get(guarded, "/v2/health/live").status_code == 200  # a small head still passes


def test_silent_and_trickling_connections_are_closed(guarded):
    """Nothing sent, half a request line, an idle keep-alive: each is closed (issue 17, defect 5)."""
    started = time.monotonic()
    assert exchange(guarded.port, b"") == b""
    half = exchange(guarded.port, b"GET /v2/hea")
    assert half.startswith(b"HTTP/1.1 408") and "--header-timeout-s" in json_error(half)
    kept_alive = exchange(guarded.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept_alive.startswith(b"HTTP/1.1 200") and kept_alive.endswith(b'{"live":true}')
    assert time.monotonic() - started < 8, "each connection was closed within its timeout"


def test_protocol_errors_are_answered_as_json(guarded):
    requests = {
        "two lengths": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "length and chunked": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "not http": b"\x16\x03\x01 hello\r\n\r\n",
    }
    for name, request in requests.items():
        reply = exchange(guarded.port, request)
        assert reply.startswith(b"HTTP/1.1 400"), (name, reply[:200])
        assert json_error(reply).startswith("invalid HTTP request"), name


def test_past_max_connections_a_new_connection_gets_503_json(bundle):
    limits = ConnectionLimits(max_connections=3, header_timeout_s=30)
    with serving(bundle, limits=limits) as live:
        held = [socket.create_connection((HOST, live.port), timeout=10) for _ in range(3)]
        try:
            wait_for(lambda: len(live.server.server_state.connections) == 3)
            refused = exchange(live.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert refused.startswith(b"HTTP/1.1 503") and "--max-connections" in json_error(refused)
        finally:
            for connection in held:
                connection.close()
        wait_for(lambda: len(live.server.server_state.connections) == 0)
        assert get(live, "/v2/health/live").status_code == 200


# -- the adaptive ladder: `full` is a point of every bundle, and the order is checked -------------------
def test_full_is_on_every_ladder_and_a_ladder_out_of_order_is_refused(bundle):
    """`--adaptive-points full,...` needs no saved "full" point (issue 17, defect 8); fast-before-accurate fails the start."""
    ladder = ControllerSettings(slo_p99_ms=1000, points=("full", "fast"), dwell_s=60)
    with serving(bundle, controller=ladder) as live:
        assert live.service.runtime.operating_point.policy == "full"
        assert post(live, "/v1/classify", {"texts": ["good"]}).json()["predictions"][0]["exit_layer"] == 4
    backwards = ControllerSettings(slo_p99_ms=1000, points=("fast", "quality"), dwell_s=60)
    with serving(bundle, controller=backwards, wait_ready=False) as live:
        wait_for(lambda: live.service.failure is not None)
        failure = live.service.failure
    assert "'quality' (layer speed-up 0.000) comes after 'fast' (0.750)" in failure
    assert "--adaptive-points quality,fast" in failure


# -- OIP completeness and operations -------------------------------------------------------------------
def test_server_metadata_versioned_routes_and_triton_model_config(server):
    """GET /v2, .../versions/1/..., and .../config in Triton's shape were 404 (issue 17, defect 7)."""
    assert get(server, "/v2").json() == {
        "name": "pcee-serve",
        "version": get(server, "/v2").json()["version"],
        "extensions": [],
    }
    versioned = f"/v2/models/{MODEL}/versions/1"
    assert get(server, versioned).json()["versions"] == ["1"]
    assert get(server, versioned + "/ready").json() == {"name": MODEL, "ready": True}
    reply = post(server, versioned + "/infer", infer_body(SENTENCES[:2])).json()
    assert reply["model_version"] == "1" and reply["outputs"][0]["shape"] == [2]
    assert get(server, f"/v2/models/{MODEL}/versions/2/ready").status_code == 404
    config = get(server, f"/v2/models/{MODEL}/config").json()
    assert config["max_batch_size"] == 0
    assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert [output["data_type"] for output in config["output"]] == ["TYPE_STRING", "TYPE_FP32", "TYPE_INT32"]
    assert get(server, versioned + "/config").json() == config
    triton = pytest.importorskip(
        "tritonclient.http", reason="tritonclient[http] reads the config as Triton's client"
    )
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.get_model_config(MODEL)["input"][0]["name"] == "text"
    assert client.get_server_metadata()["name"] == "pcee-serve"
    client.close()


def test_request_ids_are_echoed_or_made(server):
    given = post(server, "/v1/classify", {"texts": ["good"]}, headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = get(server, "/v2/health/live").headers["x-request-id"]
    assert len(made) == 32 and made != get(server, "/v2/health/live").headers["x-request-id"]
    unprintable = get(server, "/nowhere")
    assert unprintable.status_code == 404 and len(unprintable.headers["x-request-id"]) == 32


def test_json_logs_have_timestamps_and_the_access_log_has_the_request_id(bundle):
    """Every log line is timestamped; --log-format json writes one object a line (issue 17, defect 8)."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    process = start_cli(bundle, port, "--log-level", "info", "--log-format", "json", "--access-log")
    try:
        wait_for(lambda: probe_ready(url) or process.poll() is not None, timeout=60)
        httpx.post(url + "/v1/classify", json={"texts": ["good"]}, headers={"X-Request-ID": "trace-7"})
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    entries = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    assert entries and all(entry["time"].endswith("Z") and entry["level"] for entry in entries)
    access = [entry for entry in entries if entry["logger"] == "pcee.serving.access"]
    classify = next(entry for entry in access if entry["path"] == "/v1/classify")
    assert classify["request_id"] == "trace-7" and classify["status"] == 200 and classify["duration_ms"] > 0
    assert any("draining" in entry["message"] for entry in entries)


def test_a_lone_row_runs_the_compiled_single_row_graph_and_a_batch_the_chain(bundle, reference):
    with serving(bundle) as live:
        compiled = live.service.runtime.backend.single_row
        answered = []
        real_outcome = compiled.outcome

        def counted_outcome(*args):
            answered.append(real_outcome(*args))
            return answered[-1]

        compiled.outcome = counted_outcome
        try:
            lone = post(live, f"/v2/models/{MODEL}/infer", infer_body(SENTENCES[:1])).json()
            assert len(answered) == 1 and answered[0] is not None  # one row: one call of the compiled graph
            batch = post(live, f"/v2/models/{MODEL}/infer", infer_body(SENTENCES[:3])).json()
            assert len(answered) == 1  # three rows: the chain
        finally:
            compiled.outcome = real_outcome
    for reply, texts in ((lone, SENTENCES[:1]), (batch, SENTENCES[:3])):
        outputs = {output["name"]: output["data"] for output in reply["outputs"]}
        assert outputs["exit_layer"] == [row.exit_layer for row in reference.predict(texts).predictions]
