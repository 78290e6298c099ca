"""The README's snippets and runtime-side commands run as written on the demo's output layout.

A tiny SST-2 bundle stands in for the demo's at `runs/demo/sst2-pcee` (same labels, a saved
point named `demo`), in a scratch directory that also holds the demo's data as `demo/data`.
The Python snippets are executed; the pcee-predict, pcee-calibrate and pcee-eval lines are
run in the order the README gives them. (pcee-train, pcee-export, pcee-bench and pcee-demo
lines need the real backbone and minutes of work: the demo test and the CLI tests cover them.)
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import make_tiny_model_dir

from pcee.calibration.bundle import record_in_manifest
from pcee.calibration.cli import calibrate_main, eval_main
from pcee.exporter.bundle import ExportOptions, export_bundle
from pcee.runtime import OperatingPoint
from pcee.runtime.cli import main as predict_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = {"pcee-predict": predict_main, "pcee-calibrate": calibrate_main, "pcee-eval": eval_main}


def python_snippets() -> list[str]:
    """Every ```python block."""
    return re.findall(r"```python\n(.*?)```", README, re.S)


def command_lines() -> list[str]:
    """Indented README lines that call one of COMMANDS on the demo's bundle, in README order."""
    return [
        line.strip()
        for line in README.splitlines()
        if line.startswith("    ") and line.split()[0] in COMMANDS and "runs/demo/" in line
    ]


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    model_dir = make_tiny_model_dir(root / "models", task="sst2", label_names=["negative", "positive"])
    bundle = export_bundle(model_dir, root / "runs" / "demo" / "sst2-pcee", ExportOptions()).bundle_dir
    record_in_manifest(bundle, OperatingPoint("pcee", tau=0.5, patience=1, name="demo"), {})
    shutil.copytree(ROOT / "demo" / "data", root / "demo" / "data")
    (root / "reviews.txt").write_text("a gripping, funny film\n\ndull and far too long\n")
    return root


def test_the_readme_has_snippets_and_commands_to_check():
    assert python_snippets() and {line.split()[0] for line in command_lines()} == set(COMMANDS)


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_python_snippets_run_as_written(demo_layout, monkeypatch, index):
    monkeypatch.chdir(demo_layout)
    exec(compile(python_snippets()[index], f"README.md python block {index + 1}", "exec"), {})


def test_commands_run_as_written_in_readme_order(demo_layout, monkeypatch):
    monkeypatch.chdir(demo_layout)
    for line in command_lines():
        program, *arguments = shlex.split(line)
        result = CliRunner().invoke(COMMANDS[program], arguments)
        assert result.exit_code == 0, f"{line}\n{result.output}"
