"""The docs' examples run as written on the demo's output, like the README's (tests/test_docs_readme.py).

Each doc's paths are the demo's (`runs/demo/sst2`, `runs/demo/sst2-pcee`), and each saved point it
names is one the demo creates (or the doc's own pcee-calibrate lines do). On the layout of
tests/doc_examples.py: the pcee-predict, pcee-calibrate and pcee-eval lines run in the doc's order;
the Python snippets run; every pcee-serve line starts the real server (on a free port in place of
8000) and, on the first one, the curl lines, the tritonclient snippet and the load test's `--url`
lines run against it; the load test's `--bundle` lines run, each rate cut to a second; GPU.md's
`--dry-run` prints the form the doc shows. Lines that need what a test cannot have (a Ray cluster,
`/shared`, a GPU, earlier result files) are the only ones left out, by the rules in `not_runnable`.
Commands of other programs a doc adds later are checked for paths and points only.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from doc_examples import (
    COMMANDS,
    DEMO_BUNDLE,
    DEMO_MODEL,
    DEMO_WORKDIR,
    ROOT,
    build_demo_layout,
    commands_of,
    doc_text,
    on_test_ports,
    point_names_created,
    point_names_used,
    program_of,
    python_snippets,
    run_command,
    run_paths,
    run_shell,
    shell_commands,
)

DOCS = [f"docs/{name}" for name in ("SERVING.md", "CALIBRATION.md", "GPU.md", "TRITON.md")]
DOCS = [doc for doc in DOCS if (ROOT / doc).is_file()]
SERVED_DOCS = ["README.md", "docs/SERVING.md"]
DOC_PORT = 8000
LOAD_TEST = "pcee.benchmarks.serve_load"


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    root = tmp_path_factory.mktemp("docs")
    return root, build_demo_layout(root)


def not_runnable(command: str) -> str | None:
    """Why a documented command cannot run in a test, or None."""
    if "--ray" in command or "RAY_ADDRESS" in command:
        return "needs a Ray cluster (tests/test_serving_ray.py starts one, marked slow)"
    if "/shared/" in command:
        return "a path on a cluster's shared file system"
    if f"{LOAD_TEST} plot" in command:
        return "draws result files of earlier load tests (tests/test_serve_load.py covers plot)"
    if "gpu_check.py" in command and "--dry-run" not in command:
        return "needs a GPU machine"
    return None


@pytest.mark.parametrize("doc", [*DOCS, "README.md"])
def test_docs_name_the_demos_paths(doc):
    ours = {str(DEMO_MODEL), str(DEMO_BUNDLE)}
    stray = {
        path
        for path in run_paths(doc_text(doc))
        if path not in ours and not path.startswith(f"{DEMO_WORKDIR}/")
    }
    assert not stray, f"{doc} names {sorted(stray)}; the demo writes {sorted(ours)}"


@pytest.mark.parametrize("doc", [*DOCS, "README.md"])
def test_docs_use_points_the_demo_or_the_doc_creates(doc, demo_layout):
    _, ladder = demo_layout
    text = doc_text(doc)
    unknown = point_names_used(text) - set(ladder) - point_names_created(text)
    assert not unknown, f"{doc} uses points {sorted(unknown)}; the demo saves {list(ladder)}"


def test_the_demos_ladder_is_the_one_serving_md_climbs(demo_layout):
    _, ladder = demo_layout
    assert f"--adaptive-points {','.join(ladder)}" in doc_text("docs/SERVING.md")


@pytest.mark.parametrize("doc", [doc for doc in DOCS if commands_of(doc_text(doc), *COMMANDS)])
def test_cli_commands_run_in_doc_order(doc, demo_layout, monkeypatch):
    monkeypatch.chdir(demo_layout[0])
    for command in commands_of(doc_text(doc), *COMMANDS):
        run_command(command)


def snippets_to_run() -> list[tuple[str, int]]:
    return [(doc, index) for doc in DOCS for index in range(len(python_snippets(doc_text(doc))))]


@pytest.mark.parametrize(("doc", "index"), snippets_to_run())
def test_python_snippets_run_as_written(doc, index, demo_layout):
    snippet = python_snippets(doc_text(doc))[index]
    if "from ray" in snippet:
        pytest.skip("needs a Ray cluster and a shared file system")
    if "tritonclient" in snippet:
        pytest.skip(
            "talks to a running server: test_served_examples_answer runs it against pcee-serve, and "
            "tests/test_triton.py's test_triton_md_runs_as_written against tritonserver"
        )
    # In its own process: a snippet may register a policy or set globals that later tests must not see.
    completed = subprocess.run(
        [sys.executable, "-c", snippet], cwd=demo_layout[0], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, f"{doc} python block {index + 1}:\n{completed.stderr}"


# -- the server's examples ---------------------------------------------------------------------------
def server_arguments(command: str) -> list[str]:
    """pcee-serve's arguments as written, less --host/--port (the test picks a free port)."""
    words = shlex.split(command, comments=True)
    words = words[words.index("pcee-serve") + 1 :]
    arguments = []
    for word in words:
        if word == "&":
            continue
        if arguments and arguments[-1] in ("--port", "--host"):
            arguments.pop()
            continue
        arguments.append(word)
    return arguments


def on_test_server(command: str, url: str) -> str:
    return on_test_ports(command, {DOC_PORT: url.removeprefix("http://")})


def load_test_command(command: str, url: str) -> list[str]:
    """The load test as written, against the test's server, each rate cut to a second."""
    words = shlex.split(on_test_server(command, url), comments=True)
    words = words[words.index(LOAD_TEST) + 1 :]
    return [
        sys.executable,
        "-m",
        LOAD_TEST,
        words[0],
        "--duration-s",
        "1",
        "--max-requests",
        "20",
        *words[1:],
    ]


@pytest.mark.parametrize("doc", SERVED_DOCS)
def test_served_examples_answer(doc, demo_layout, monkeypatch):
    pytest.importorskip("starlette", reason="pcee-serve comes with pcee[serve]")
    pytest.importorskip("httpx", reason="the load test's client comes with pcee[dev]")
    from pcee.benchmarks.serve_load import started_server

    monkeypatch.chdir(demo_layout[0])
    text = doc_text(doc)
    servers = [command for command in commands_of(text, "pcee-serve") if not not_runnable(command)]
    assert servers, f"{doc} shows no pcee-serve line to run"
    for number, command in enumerate(servers):
        bundle, *options = server_arguments(command)
        with started_server(Path(bundle), tuple(options)) as url:
            if number == 0:
                run_client_examples(text, url)
    for command in commands_of(text, "python", "python3"):
        if f"{LOAD_TEST} run" in command and "--bundle" in command and "--url" not in command:
            subprocess.run(load_test_command(command, ""), check=True, capture_output=True, timeout=300)


def run_client_examples(text: str, url: str) -> None:
    for command in commands_of(text, "curl"):
        answer = json.loads(run_shell(on_test_server(command, url)))
        assert "error" not in answer, f"{command}\n{answer}"
    for snippet in python_snippets(text):
        if "tritonclient" in snippet:
            exec(
                compile(on_test_server(snippet, url), "tritonclient snippet", "exec"),
                {},
            )
    for command in commands_of(text, "python", "python3"):
        if f"{LOAD_TEST} run" in command and "--url" in command:
            subprocess.run(load_test_command(command, url), check=True, capture_output=True, timeout=300)


# -- GPU.md: the CPU side -----------------------------------------------------------------------------
def test_gpu_check_dry_run_prints_what_gpu_md_shows():
    text = doc_text("docs/GPU.md")
    dry_run = next(command for command in shell_commands(text) if "gpu_check.py --dry-run" in command)
    words = shlex.split(dry_run, comments=True)
    script = next(index for index, word in enumerate(words) if word.endswith("gpu_check.py"))
    completed = subprocess.run(
        [sys.executable, *words[script:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    printed, shown = json.loads(completed.stdout), shown_dry_run(text)
    assert set(shown) == set(printed)
    printed_stages = {stage["stage"]: stage for stage in printed["stages"]}
    for stage in shown["stages"]:
        assert set(stage) == set(printed_stages[stage["stage"]]), (stage, printed_stages[stage["stage"]])
    shown_order = [stage["stage"] for stage in shown["stages"]]
    assert shown_order == [name for name in printed_stages if name in shown_order]


def shown_dry_run(text: str) -> dict:
    """The JSON document GPU.md shows as the --dry-run output (an indented block)."""
    block = re.search(r"\n    \{\n.*?\n    \}\n", text, re.S)
    assert block, "GPU.md shows no --dry-run output"
    return json.loads(block.group(0))


def test_gpu_md_speaks_to_users():
    text = doc_text("docs/GPU.md")
    for internal in ("$OUT", "borrowed", "of this project"):
        assert internal not in text, f"GPU.md says {internal!r}, which means nothing to a user"


def test_the_install_table_names_what_the_runtime_only_install_brings():
    def requirements(distribution: str) -> set[str]:
        listed = requires(distribution) or []
        return {
            re.split(r"[ ;<>=!~\[(]", line)[0].lower().replace("_", "-")
            for line in listed
            if "extra ==" not in line
        }

    assert "huggingface-hub" in requirements("tokenizers") and "hf-xet" in requirements("huggingface-hub")
    row = next(
        line for line in doc_text("README.md").splitlines() if line.startswith("| `pip install pcee` |")
    )
    assert "huggingface-hub" in row and "hf_xet" in row
