"""Fuzzing every route of pcee-serve's app: whatever the body, path or headers, the answer is never a 5xx.

Hypothesis writes requests of four kinds: any JSON value, OIP- and classify-shaped objects with
wrong or hostile field values (lone surrogates, huge and non-finite numbers, deep nesting), raw
bytes, and JSON text holding integers past Python's digit limit. They go to every route through
Starlette's in-process test client (no sockets, so a few hundred cases take seconds). Each answer
must be below 500, and JSON wherever the route answers JSON.
"""

from __future__ import annotations

import json
import shutil
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from pcee.runtime import EarlyExitRuntime, Manifest, OperatingPoint
from pcee.serving import ServerSettings, create_app

MODEL = "tiny"
TOKEN = "fuzz-token"
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Every route with its methods; path parameters are fuzzed separately.
POST_ROUTES = [
    f"/v2/models/{MODEL}/infer",
    f"/v2/models/{MODEL}/versions/1/infer",
    "/v1/classify",
]
GET_ROUTES = [
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    f"/v2/models/{MODEL}",
    f"/v2/models/{MODEL}/ready",
    f"/v2/models/{MODEL}/config",
    f"/v2/models/{MODEL}/versions/1",
    f"/v2/models/{MODEL}/versions/1/ready",
    f"/v2/models/{MODEL}/versions/1/config",
    "/metrics",
]


@pytest.fixture(scope="module")
def client(tiny_bundles, tmp_path_factory):
    bundle = shutil.copytree(tiny_bundles.bundle(num_layers=2), tmp_path_factory.mktemp("fuzz") / "bundle")
    manifest = Manifest.load(bundle)
    manifest.operating_points.append(OperatingPoint("budgeted", layer=1, name="fast"))
    manifest.save(bundle)
    app = create_app(
        ServerSettings(model_name=MODEL, shadow_fraction=0.5, admin_token=TOKEN, max_wait_ms=0.0),
        lambda: EarlyExitRuntime.from_bundle(bundle),
        ready_before_serving=True,
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


# -- what hypothesis writes -------------------------------------------------------------------------
any_character = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
hostile_text = st.one_of(
    st.text(any_character, max_size=30),
    st.sampled_from(["", " ", "\ud800", "good \udfff fun", "\x00", "a" * 3000, "fast", "full", "1"]),
)
hostile_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 10**300, 1e308]),
)
scalar = st.one_of(st.none(), st.booleans(), hostile_number, hostile_text)
json_value = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12,
)


def maybe(value):
    """Either the well-formed value or something hostile in its place."""
    return st.one_of(value, json_value)


tensor = st.fixed_dictionaries(
    {"name": maybe(st.sampled_from(["text", "text_pair", "label"]))},
    optional={
        "datatype": maybe(st.sampled_from(["BYTES", "FP32", "INT64"])),
        "shape": maybe(st.lists(hostile_number, max_size=3)),
        "data": maybe(st.lists(hostile_text, max_size=4)),
        "parameters": json_value,
    },
)
oip_body = st.fixed_dictionaries(
    {"inputs": maybe(st.lists(tensor, max_size=3))},
    optional={
        "id": maybe(hostile_text),
        "parameters": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "operating_point": maybe(st.sampled_from(["fast", "default", "full"])),
                    "timeout": maybe(hostile_number),
                },
            )
        ),
        "outputs": maybe(st.lists(st.fixed_dictionaries({"name": maybe(st.sampled_from(["label", "x"]))}))),
    },
)
classify_body = st.fixed_dictionaries(
    {"texts": maybe(st.lists(hostile_text, max_size=4))},
    optional={
        "text_pairs": maybe(st.lists(hostile_text, max_size=4)),
        "operating_point": maybe(st.sampled_from(["fast", "default", "full"])),
    },
)
admin_body = st.fixed_dictionaries(
    {"operating_point": maybe(st.sampled_from(["fast", "default", "full"]) | st.just({"policy": "budgeted"}))}
)


def encoded(value) -> bytes:
    """JSON as a client would send it: lone surrogates travel as \\ud800 escapes; NaN and Infinity as literals."""
    return json.dumps(value, ensure_ascii=True).encode()


huge_integer = st.integers(min_value=4301, max_value=6000).map(lambda digits: b"1" * digits)
raw_body = st.one_of(
    st.binary(max_size=200),
    huge_integer,
    huge_integer.map(lambda number: b'{"texts": ["good"], "operating_point": ' + number + b"}"),
    huge_integer.map(
        lambda number: (
            b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [' + number + b'], "data": ["a"]}]}'
        )
    ),
    st.integers(min_value=1, max_value=3000).map(lambda depth: b"[" * depth + b"]" * depth),
)
any_body = st.one_of(
    oip_body.map(encoded),
    classify_body.map(encoded),
    json_value.map(encoded),
    admin_body.map(encoded),
    raw_body,
)
header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
headers = st.fixed_dictionaries(
    {},
    optional={
        "X-Request-ID": header_value,
        "X-Request-Timeout-Ms": header_value | hostile_number.map(str),
        "Content-Type": st.sampled_from(["application/json", "text/plain", "application/octet-stream"]),
        "Authorization": st.sampled_from([f"Bearer {TOKEN}", "Bearer nope", "Basic x", ""]),
        "Inference-Header-Content-Length": st.sampled_from(["0", "12", "x"]),
    },
)
path_segment = st.text(
    st.characters(
        min_codepoint=0x21, max_codepoint=0x10FFFF, exclude_characters="/?#%", exclude_categories=("Cs",)
    ),
    min_size=1,
    max_size=12,
)


def assert_answered(response, path: str) -> None:
    assert response.status_code < 500, f"{path}: {response.status_code} {response.text[:300]}"
    if path != "/metrics":
        response.json()  # every answer but the metrics is JSON


@FUZZ
@given(path=st.sampled_from(POST_ROUTES), body=any_body, extra_headers=headers)
def test_no_body_or_header_gets_a_5xx(client, path, body, extra_headers):
    assert_answered(client.post(path, content=body, headers=extra_headers), path)


@FUZZ
@given(body=any_body, extra_headers=headers)
def test_the_admin_route_never_answers_5xx(client, body, extra_headers):
    response = client.put("/v1/operating-point", content=body, headers=extra_headers)
    assert_answered(response, "/v1/operating-point")
    client.put(
        "/v1/operating-point",
        json={"operating_point": "default"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


@FUZZ
@given(
    template=st.sampled_from(
        ["/v2/models/{}", "/v2/models/{}/ready", "/v2/models/{}/config", "/v2/models/tiny/versions/{}/ready"]
    ),
    segment=path_segment,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
)
def test_fuzzed_paths_and_methods_never_answer_5xx(client, template, segment, method):
    path = template.format(quote(segment, safe=""))
    response = client.request(method, path)
    assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"


@pytest.mark.parametrize("path", GET_ROUTES)
def test_every_get_route_answers(client, path):
    assert_answered(client.get(path), path)
