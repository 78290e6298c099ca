"""The README's snippets and runtime-side commands run as written on the demo's output layout.

The layout (tests/doc_examples.py) is what `pcee-demo` writes, from a tiny SST-2 model: the bundle at
`runs/demo/sst2-pcee` with the demo's saved points, the demo's data as `demo/data`. The Python
snippets are executed; the pcee-predict, pcee-calibrate and pcee-eval lines are run in the order the
README gives them. (pcee-train, pcee-export, pcee-bench and pcee-demo lines need the real backbone and
minutes of work: the demo test and the CLI tests cover them.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_examples import COMMANDS, build_demo_layout, commands_of, doc_text, python_snippets, run_command

README = doc_text("README.md")


def command_lines() -> list[str]:
    """README commands of COMMANDS on the demo's bundle, in README order."""
    return [line for line in commands_of(README, *COMMANDS) if "runs/demo/" in line]


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    build_demo_layout(root)
    return root


def test_the_readme_has_snippets_and_commands_to_check():
    assert python_snippets(README) and {line.split()[0] for line in command_lines()} == set(COMMANDS)


@pytest.mark.parametrize("index", range(len(python_snippets(README))))
def test_python_snippets_run_as_written(demo_layout, monkeypatch, index):
    monkeypatch.chdir(demo_layout)
    exec(compile(python_snippets(README)[index], f"README.md python block {index + 1}", "exec"), {})


def test_commands_run_as_written_in_readme_order(demo_layout, monkeypatch):
    monkeypatch.chdir(demo_layout)
    for line in command_lines():
        run_command(line)
