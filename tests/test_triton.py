"""`pcee-triton` repositories served by the real `tritonserver` binary (nvidia-pytriton wheel, server 2.51).

The server runs in its own Python environment (numpy < 2), built by `deploy/triton-env.sh`; `.ci/run`
builds it first, and the fixture below builds it when missing, so these tests never skip. Clients
are NVIDIA's tritonclient, over HTTP and gRPC, on free loopback ports. Last, docs/TRITON.md's commands
and snippet run as written on the demo's output (tests/doc_examples.py), against the server its
launcher line starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc_client
import tritonclient.http as http_client
from bundles import SENTENCES
from click.testing import CliRunner
from doc_examples import (
    DEMO_BUNDLE,
    build_demo_layout,
    commands_of,
    doc_text,
    on_test_ports,
    program_of,
    python_snippets,
    run_command,
    run_shell,
    shell_commands,
)
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from pcee.deploy import DeployError, TritonOptions, write_triton_repository
from pcee.deploy.cli import main as triton_cli
from pcee.deploy.triton_requests import RowsRequest, answer, read_request
from pcee.runtime import EarlyExitRuntime, InputError, Manifest, OperatingPoint, PolicyError

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_DIR = REPO_ROOT / ".triton-venv"
HOST = "127.0.0.1"
BATCHED_ROWS = 6  # the "batched" model runs exactly this many rows at once, or waits BATCH_WAIT_US
BATCH_WAIT_US = 5_000_000
STARTUP_S = 240


def texts_to_classify(count: int, seed: int = 0) -> list[str]:
    chooser = random.Random(seed)
    return [" ".join(chooser.sample(SENTENCES, chooser.randint(1, 3))) for _ in range(count)]


TEXTS = texts_to_classify(200)


def spaced_entropy_point(bundle: Path, name: str) -> OperatingPoint:
    """A pcee point whose tau sits in the widest gap between the middle first-exit entropies, so about
    half the rows exit at layer 1, and float noise from another batch composition moves none across."""
    with EarlyExitRuntime.from_bundle(bundle) as runtime:
        entropies = np.unique(runtime.run_all_exits(runtime.tokenizer.encode_texts(TEXTS)).entropy[:, 0])
    middle = entropies[len(entropies) // 4 : 3 * len(entropies) // 4]
    widest = int(np.argmax(np.diff(middle)))
    return OperatingPoint("pcee", tau=float(middle[widest : widest + 2].mean()), patience=1, name=name)


# -- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tritonserver() -> Path:
    """The launcher of the Triton environment; building it takes about a minute the first time."""
    subprocess.run(["bash", str(REPO_ROOT / "deploy" / "triton-env.sh"), str(ENV_DIR)], check=True)
    return ENV_DIR / "bin" / "tritonserver"


@pytest.fixture(scope="module")
def bundle(tiny_bundles, tmp_path_factory) -> Path:
    """A 4-layer bundle with saved points "fast" (exit at layer 1), "quality" (all layers) and "varied"."""
    shared = tiny_bundles.bundle(num_layers=4, task="sst2")
    bundle_dir = shutil.copytree(shared, tmp_path_factory.mktemp("triton") / shared.name)
    manifest = Manifest.load(bundle_dir)
    manifest.operating_points += [
        OperatingPoint("budgeted", layer=1, name="fast"),
        OperatingPoint("full", name="quality"),
        spaced_entropy_point(bundle_dir, "varied"),
    ]
    manifest.save(bundle_dir)
    return bundle_dir


@pytest.fixture(scope="module")
def reference(bundle):
    with EarlyExitRuntime.from_bundle(bundle, operating_point="varied") as runtime:
        yield runtime


MODELS = {
    "tiny": dict(operating_point="varied", intra_op_threads=1),
    "batched": dict(max_batch_size=BATCHED_ROWS, max_queue_delay_us=BATCH_WAIT_US, intra_op_threads=1),
    "metered": dict(operating_point="varied", intra_op_threads=1),
}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for listener in sockets:
        listener.bind((HOST, 0))
    ports = [listener.getsockname()[1] for listener in sockets]
    for listener in sockets:
        listener.close()
    return ports


class TritonServer:
    def __init__(self, process: subprocess.Popen, ports: list[int], log: Path):
        self.process, self.log = process, log
        self.http_url, self.grpc_url, self.metrics_url = (f"{HOST}:{port}" for port in ports)
        self.http, self.grpc = self.client("http"), self.client("grpc")

    def client(self, protocol: str):
        """A new client: tritonclient's HTTP client must not be shared between threads."""
        if protocol == "http":
            return http_client.InferenceServerClient(self.http_url)
        return grpc_client.InferenceServerClient(self.grpc_url)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"tritonserver exited:\n{self.log_tail()}"
            try:
                if self.http.is_server_ready():
                    return
            except (InferenceServerException, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"tritonserver not ready in {STARTUP_S} s:\n{self.log_tail()}")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.metrics_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture(scope="module")
def repository(tmp_path_factory, bundle, pair_bundle) -> Path:
    directory = tmp_path_factory.mktemp("repository")
    for name, options in MODELS.items():
        write_triton_repository(bundle, directory, TritonOptions(model_name=name, **options))
    write_triton_repository(pair_bundle, directory, TritonOptions(model_name="pairs", intra_op_threads=1))
    broken = write_triton_repository(bundle, directory, TritonOptions(model_name="broken"))
    with open(broken.model_dir / "1" / "bundle" / "onnx" / "layer_02.onnx", "ab") as graph:
        graph.write(b"changed after pcee-triton checked it")
    return directory


@contextlib.contextmanager
def running_tritonserver(command: list[str], log: Path, cwd: Path = REPO_ROOT) -> Iterator[TritonServer]:
    """`command` (a tritonserver launcher and its options) on free HTTP, gRPC and metrics ports, ready;
    stopped on leaving. A short exit timeout: the test's requests are all answered by then."""
    ports = free_ports(3)
    ports_and_exit = [
        f"--http-port={ports[0]}",
        f"--grpc-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        "--exit-timeout-secs=5",
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*command, *ports_and_exit], cwd=cwd, stdout=output, stderr=subprocess.STDOUT
        )
    live = TritonServer(process, ports, log)
    try:
        live.wait_ready()
        yield live
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tritonserver, repository, tmp_path_factory):
    command = [
        str(tritonserver),
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in [*MODELS, "pairs"]),
    ]
    with running_tritonserver(command, tmp_path_factory.mktemp("triton-log") / "tritonserver.log") as live:
        yield live


# -- requests --------------------------------------------------------------------------------------
def rows_input(module, name: str, texts: list[str]):
    tensor = module.InferInput(name, [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()] for text in texts], dtype=np.object_))
    return tensor


def infer(client, model: str, texts: list[str], pairs=None, point: str | None = None) -> dict:
    module = grpc_client if isinstance(client, grpc_client.InferenceServerClient) else http_client
    inputs = [rows_input(module, "text", texts)]
    if pairs is not None:
        inputs.append(rows_input(module, "text_pair", pairs))
    parameters = None if point is None else {"operating_point": point}
    return answers_of(client.infer(model, inputs, parameters=parameters))


def answers_of(result) -> dict:
    return {
        "label": [label.decode() for label in result.as_numpy("label").reshape(-1)],
        "probabilities": result.as_numpy("probabilities"),
        "exit_layer": result.as_numpy("exit_layer").reshape(-1).tolist(),
    }


def expected(runtime: EarlyExitRuntime, texts: list[str], pairs=None, point=None) -> dict:
    rows = runtime.predict(texts, pairs, operating_point=point).predictions
    return {
        "label": [row.label for row in rows],
        "probabilities": np.stack([row.probabilities for row in rows]),
        "exit_layer": [row.exit_layer for row in rows],
    }


def assert_same_answers(served: dict, wanted: dict) -> None:
    assert served["label"] == wanted["label"]
    assert served["exit_layer"] == wanted["exit_layer"]
    np.testing.assert_allclose(served["probabilities"], wanted["probabilities"], rtol=0, atol=1e-5)


# -- against the real server -----------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_and_models_are_ready_with_oip_metadata(server, protocol):
    client = getattr(server, protocol)
    assert client.is_server_live() and client.is_server_ready()
    for name in [*MODELS, "pairs"]:
        assert client.is_model_ready(name), f"{name} not ready:\n{server.log_tail()}"
    metadata = client.get_model_metadata("tiny", **({"as_json": True} if protocol == "grpc" else {}))
    if protocol == "grpc":  # protobuf's JSON writes int64 sizes as strings
        for tensor in metadata["inputs"] + metadata["outputs"]:
            tensor["shape"] = [int(size) for size in tensor["shape"]]
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
    assert metadata["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1, 1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "exit_layer", "datatype": "INT32", "shape": [-1, 1]},
    ]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_200_texts_are_answered_as_the_runtime_answers_them(server, reference, protocol):
    client = getattr(server, protocol)
    exits = []
    for start in range(0, len(TEXTS), 20):
        chunk = TEXTS[start : start + 20]
        served = infer(client, "tiny", chunk)
        assert_same_answers(served, expected(reference, chunk))
        exits += served["exit_layer"]
    assert len(set(exits)) > 1, "the served point should make rows exit at different layers"


def test_concurrent_clients_with_mixed_points_each_get_their_own_rows(server, reference):
    chooser = random.Random(1)
    requests = []
    for index in range(48):
        start = chooser.randrange(len(TEXTS) - 5)
        point = chooser.choice([None, "fast", "quality", "varied", "default"])
        requests.append((["http", "grpc"][index % 2], TEXTS[start : start + chooser.randint(1, 5)], point))

    def send(request):
        protocol, texts, point = request
        return infer(server.client(protocol), "tiny", texts, point=point)

    before = executions_and_requests(server, "tiny")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests))
    after = executions_and_requests(server, "tiny", before[1] + len(requests))
    executions, successes = np.subtract(after, before)
    for (_, texts, point), served in zip(requests, answers):
        assert_same_answers(served, expected(reference, texts, point=point))
    fast = [served for (_, _, point), served in zip(requests, answers) if point == "fast"]
    assert fast and all(layer == 1 for served in fast for layer in served["exit_layer"])
    assert successes == len(requests) and executions < successes, "the dynamic batcher merged requests"


def model_stats(server, model: str, successes: int = 0) -> dict:
    """The model's statistics once they count `successes` requests (Triton counts just after it answers)."""
    deadline = time.monotonic() + 10
    while True:
        stats = server.http.get_inference_statistics(model)["model_stats"][0]
        if int(stats["inference_stats"]["success"]["count"]) >= successes or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def executions_and_requests(server, model: str, successes: int = 0) -> tuple[int, int]:
    stats = model_stats(server, model, successes)
    return int(stats["execution_count"]), int(stats["inference_stats"]["success"]["count"])


def test_pair_bundle_takes_text_pairs(server, pair_bundle):
    questions = ["who did this", "what a great film", "how was the day"]
    answers = ["the actors did this", "it was a dull story", "the best day"]
    with EarlyExitRuntime.from_bundle(pair_bundle) as runtime:
        wanted = expected(runtime, questions, answers)
    for client in (server.http, server.grpc):
        assert_same_answers(infer(client, "pairs", questions, answers), wanted)
    with pytest.raises(InferenceServerException, match="text_pair"):
        infer(server.http, "pairs", questions)


def test_bad_requests_inside_one_dynamic_batch_fail_alone(server, reference):
    """BATCHED_ROWS one-row requests arrive together: the batcher runs them as one call, in which
    undecodable bytes and an unknown point get their own errors and the others their rows."""
    good = TEXTS[:4]

    def send(index: int):
        if index == 4:
            tensor = http_client.InferInput("text", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[b"\xff\xfe not utf-8"]], dtype=np.object_))
            return server.client("http").infer("batched", [tensor])
        point = "no-such-point" if index == 5 else None
        return infer(server.client(["http", "grpc"][index % 2]), "batched", [good[index % 4]], point=point)

    with ThreadPoolExecutor(BATCHED_ROWS) as pool:
        futures = [pool.submit(send, index) for index in range(BATCHED_ROWS)]
    for index in range(4):
        assert_same_answers(futures[index].result(), expected(reference, [good[index]], point="default"))
    with pytest.raises(InferenceServerException, match="InputError: input 'text' element 0 is not UTF-8"):
        futures[4].result()
    with pytest.raises(InferenceServerException, match="no operating point named 'no-such-point'"):
        futures[5].result()
    stats = model_stats(server, "batched", successes=4)
    assert int(stats["execution_count"]) == 1, f"all {BATCHED_ROWS} requests ran in one call: {stats}"
    assert [int(batch["batch_size"]) for batch in stats["batch_stats"]] == [BATCHED_ROWS]


def test_custom_metrics_count_the_rows_and_layers_of_the_answers(server):
    answers = [infer(server.http, "metered", TEXTS[start : start + 25]) for start in range(0, 100, 25)]
    answers.append(infer(server.grpc, "metered", TEXTS[:10], point="fast"))
    exits = [layer for served in answers for layer in served["exit_layer"]]
    samples = {}

    def value(name: str, **labels) -> float:
        key = (name, tuple(sorted({"model": "metered", "version": "1", **labels}.items())))
        return samples.get(key, 0.0)

    # Triton counts a request a moment after its response is sent; the parser adds _total.
    deadline = time.monotonic() + 10
    while value("nv_inference_request_success_total") < len(answers) and time.monotonic() < deadline:
        time.sleep(0.1)
        samples = server.metrics()

    for layer in range(1, 5):
        assert value("pcee_rows_total", exit_layer=str(layer)) == exits.count(layer)
    assert value("pcee_layers_total", kind="run") == sum(exits)
    assert value("pcee_layers_total", kind="possible") == len(exits) * 4
    assert value("nv_inference_request_success_total") == len(answers)


def test_a_bundle_that_fails_its_checks_fails_the_model_load_with_the_runtime_message(server):
    with pytest.raises(InferenceServerException, match="BundleError: .*layer_02.onnx: sha256 does not match"):
        server.http.load_model("broken")
    states = {entry["name"]: entry for entry in server.http.get_model_repository_index()}
    assert states["broken"]["state"] == "UNAVAILABLE"
    assert "sha256 does not match the manifest" in states["broken"]["reason"]
    assert server.http.is_model_ready("tiny"), "the other models keep serving"


# -- without a server ------------------------------------------------------------------------------
def test_requests_are_checked_alone_and_a_refused_row_fails_only_its_request(reference):
    texts = np.array([[b"a dull story"], [b"love it"]], dtype=np.object_)
    good = read_request(reference, texts, None, "{}")
    assert good == RowsRequest(["a dull story", "love it"], None, None, (2, 1))
    with pytest.raises(PolicyError, match="no operating point named 'nope'"):
        read_request(reference, texts, None, json.dumps({"operating_point": "nope"}))
    with pytest.raises(InputError, match="must be the name of a saved operating point"):
        read_request(reference, texts, None, json.dumps({"operating_point": 3}))
    with pytest.raises(InputError, match="classifies single sentences"):
        read_request(reference, texts, texts, "{}")
    blank = RowsRequest(["   "], None, None, (1, 1))  # the tokenizer refuses it only inside the batch
    error = InputError("a request read badly")
    answers = answer(reference, [good, blank, error, good])
    assert answers[2] is error
    assert isinstance(answers[1], InputError) and "whitespace" in str(answers[1])
    alone = RowsRequest(["   "], None, "fast", (1, 1))  # the only request of its point's group
    assert [type(item) for item in answer(reference, [good, alone])] == [list, InputError]
    wanted = reference.predict(good.texts).predictions
    for rows in (answers[0], answers[3]):
        assert [row.label for row in rows] == [row.label for row in wanted]


def test_config_is_stock_triton_text_with_the_options(bundle, tmp_path):
    options = TritonOptions(
        model_name="sst2-fast",
        max_batch_size=64,
        preferred_batch_sizes=(16, 32),
        instances=2,
        kind="gpu",
        operating_point="fast",
        intra_op_threads=2,
    )
    written = write_triton_repository(bundle, tmp_path / "repo", options)
    config = (written.model_dir / "config.pbtxt").read_text()
    for line in [
        'name: "sst2-fast"',
        'backend: "python"',
        "max_batch_size: 64",
        "preferred_batch_size: 16",
        "{ count: 2 kind: KIND_GPU }",
        'parameters { key: "operating_point" value: { string_value: "fast" } }',
        'parameters { key: "runtime_backend" value: { string_value: "auto" } }',
        'parameters { key: "intra_op_threads" value: { string_value: "2" } }',
        '{ name: "probabilities" data_type: TYPE_FP32 dims: [ 2 ] }',
    ]:
        assert line in config
    copied = written.model_dir / "1" / "bundle"
    assert Manifest.load(copied).operating_points == Manifest.load(bundle).operating_points
    assert "from pcee.runtime import" in (written.model_dir / "1" / "model.py").read_text()


def test_bad_options_and_foreign_folders_are_refused(bundle, tmp_path):
    with pytest.raises(DeployError, match="no saved operating point named 'warp'"):
        write_triton_repository(bundle, tmp_path, TritonOptions(operating_point="warp"))
    with pytest.raises(DeployError, match="preferred batch size 64 is larger than max_batch_size 8"):
        write_triton_repository(
            bundle, tmp_path, TritonOptions(max_batch_size=8, preferred_batch_sizes=(64,))
        )
    (tmp_path / "sst2").mkdir()
    with pytest.raises(DeployError, match="was not written by pcee-triton"):
        write_triton_repository(bundle, tmp_path, TritonOptions())
    assert list((tmp_path / "sst2").iterdir()) == []


def test_cli_writes_the_repository_and_reports_json(bundle, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(triton_cli, ["--help"]).output
    assert "pcee-triton runs/demo/sst2-pcee --repository runs/demo/triton" in help_text
    result = runner.invoke(triton_cli, [str(bundle), "--repository", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model_name"] == "sst2" and report["saved_points"] == [
        "default",
        "fast",
        "quality",
        "varied",
    ]
    again = runner.invoke(
        triton_cli, [str(bundle), "--repository", str(tmp_path), "--operating-point", "warp"]
    )
    assert again.exit_code == 1 and again.output.count("\n") == 1
    assert "no saved operating point named 'warp'" in again.output


def test_the_deploy_room_imports_no_torch():
    check = (
        "import sys, pcee.deploy, pcee.deploy.cli, pcee.deploy.triton_requests; print('torch' in sys.modules)"
    )
    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"


def test_one_load_client_measures_triton_and_pcee_serve(server, bundle):
    """benchmarks/oip_concurrency reads each model's metadata, so the same requests reach both servers."""
    from pcee.benchmarks.oip_concurrency import main as load_main
    from pcee.benchmarks.serve_load import started_server

    def measure(url: str) -> dict:
        arguments = ["--url", url, "--model", "tiny", "--concurrency", "1,2", "--duration-s", "1", "--json"]
        result = CliRunner().invoke(load_main, [*arguments, "--point", "fast", "--bundle", str(bundle)])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    with started_server(bundle, ("--model-name", "tiny")) as serve_url:
        reports = [measure(f"http://{server.http_url}"), measure(serve_url)]
    for report in reports:
        assert [row["concurrency"] for row in report["concurrencies"]] == [1, 2]
        for row, reference in zip(report["concurrencies"], report["in_process"]):
            assert row["errors"] == 0 and row["requests"] > 0 and row["rows_per_s"] > 0
            assert row["fraction_of_in_process"] == pytest.approx(row["rows_per_s"] / reference["rows_per_s"])


# -- docs/TRITON.md as written, on the demo's output ------------------------------------------------
TRITON_DOC = "docs/TRITON.md"
LAUNCHER = ".triton-venv/bin/tritonserver"
# The doc uses Triton's default ports; the test's server listens on free ones, and the doc's lines and
# snippet are pointed at them (as tests/test_docs.py does with pcee-serve's port 8000).
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
RUN = ("pcee-triton", "bash", LAUNCHER, "curl")
NOT_RUNNABLE = {"docker": "needs Docker and a GPU: the doc lists NVIDIA's container as not verified here"}


@pytest.fixture
def demo_checkout(tmp_path, monkeypatch, tritonserver) -> Path:
    """The demo's output in a scratch directory that stands in for the checkout, the current directory.
    Its deploy/, pyproject.toml and .triton-venv/ are the checkout's (links), so the doc's
    `bash deploy/triton-env.sh` finds the environment the `tritonserver` fixture built, and returns at
    once, as the doc says a later run does."""
    build_demo_layout(tmp_path)
    for name in ("deploy", "pyproject.toml", ".triton-venv"):
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_triton_md_runs_as_written(demo_checkout):
    """pcee-triton and the env script, then the documented server; the snippet and the curl lines
    against it answer as the in-process runtime does, and the metrics count those answers."""
    text = doc_text(TRITON_DOC)
    for command in shell_commands(text, indented=False):  # the indented blocks show a folder and PromQL
        program = program_of(command)
        assert program in (*RUN, *NOT_RUNNABLE), (
            f"{TRITON_DOC}: this test neither runs nor leaves out {command}"
        )
    for command in commands_of(text, "pcee-triton"):
        run_command(command, {"pcee-triton": triton_cli})
    for command in commands_of(text, "bash"):
        run_shell(command)
    (server_line,) = commands_of(text, LAUNCHER)
    log = demo_checkout / "tritonserver.log"
    with running_tritonserver(shlex.split(server_line), log, cwd=demo_checkout) as server:
        ports = {HTTP_PORT: server.http_url, GRPC_PORT: server.grpc_url, METRICS_PORT: server.metrics_url}
        with EarlyExitRuntime.from_bundle(demo_checkout / DEMO_BUNDLE) as reference:
            exits = check_the_snippet(text, ports, reference) + check_the_curl_request(text, ports, reference)
        check_the_curl_metrics(text, ports, exits)


def check_the_snippet(text: str, ports: dict[int, str], reference: EarlyExitRuntime) -> list[int]:
    (snippet,) = [snippet for snippet in python_snippets(text) if "tritonclient" in snippet]
    names, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(on_test_ports(snippet, ports), f"{TRITON_DOC}'s tritonclient snippet", "exec"), names)
    texts = re.findall(r'b"([^"]*)"', snippet)
    (point,) = re.findall(r'"operating_point": "([^"]+)"', snippet)
    served, wanted = answers_of(names["result"]), expected(reference, texts, point=point)
    assert_same_answers(served, wanted)
    assert all(label in printed.getvalue() for label in wanted["label"]), printed.getvalue()
    return served["exit_layer"]


def check_the_curl_request(text: str, ports: dict[int, str], reference: EarlyExitRuntime) -> list[int]:
    (request,) = [command for command in commands_of(text, "curl") if "/infer" in command]
    answer = json.loads(run_shell(on_test_ports(request, ports)))
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    texts = json.loads(shlex.split(request)[-1])["inputs"][0]["data"]
    wanted = expected(reference, texts)
    assert outputs["label"] == wanted["label"] and outputs["exit_layer"] == wanted["exit_layer"], answer
    return outputs["exit_layer"]


def check_the_curl_metrics(text: str, ports: dict[int, str], exits: list[int]) -> None:
    """The model's counters, as the doc's grep shows them, count the rows the examples were answered."""
    (scrape,) = [command for command in commands_of(text, "curl") if "/metrics" in command]
    lines = run_shell(on_test_ports(scrape, ports)).splitlines()
    assert lines and all(line.startswith("pcee_") for line in lines), lines
    samples = {
        (sample.name, sample.labels.get("exit_layer") or sample.labels.get("kind")): sample.value
        for family in text_string_to_metric_families("\n".join(lines) + "\n")
        for sample in family.samples
    }
    for layer in set(exits):
        assert samples[("pcee_rows_total", str(layer))] == exits.count(layer), samples
    assert samples[("pcee_layers_total", "run")] == sum(exits), samples
