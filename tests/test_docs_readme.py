"""The README's snippets and commands run as written on the demo's output layout, and lose nothing of it.

A tiny SST-2 model stands in for the demo's at `runs/demo/sst2`, and its bundle, exported and
calibrated as pcee-demo does (a saved point named `demo` and its report), at `runs/demo/sst2-pcee`,
in a scratch directory that also holds the demo's data as `demo/data`. The Python snippets are
executed; the pcee-export, pcee-predict, pcee-calibrate and pcee-eval lines are run in the order
the README gives them, and every saved point and report must survive to the end. (pcee-train,
pcee-bench and pcee-demo lines need the real backbone and minutes of work: the demo test and the
CLI tests cover them.)
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import make_tiny_model_dir

from pcee.calibration.cli import calibrate_main, eval_main
from pcee.exporter.cli import main as export_main
from pcee.runtime import REPORTS_DIR, Manifest
from pcee.runtime.cli import main as predict_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = {
    "pcee-export": export_main,
    "pcee-predict": predict_main,
    "pcee-calibrate": calibrate_main,
    "pcee-eval": eval_main,
}
DEMO_MODEL = Path("runs/demo/sst2")
DEMO_BUNDLE = Path("runs/demo/sst2-pcee")


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
    """What pcee-demo leaves behind: the model, and its bundle exported and calibrated with the point `demo`."""
    root = tmp_path_factory.mktemp("readme")
    model_dir = make_tiny_model_dir(root / "models", task="sst2", label_names=["negative", "positive"])
    shutil.copytree(model_dir, root / DEMO_MODEL)
    shutil.copytree(ROOT / "demo" / "data", root / "demo" / "data")
    (root / "reviews.txt").write_text("a gripping, funny film\n\ndull and far too long\n")
    demo_steps = [
        (export_main, [str(root / DEMO_MODEL), "--output", str(root / DEMO_BUNDLE), "--no-progress"]),
        (
            calibrate_main,
            [str(root / DEMO_BUNDLE), "--data", str(root / "demo" / "data"), "--task", "sst2"]
            + ["--target-speedup", "0.5", "--name", "demo", "--no-progress"],
        ),
    ]
    for command, arguments in demo_steps:
        result = CliRunner().invoke(command, arguments)
        assert result.exit_code == 0, result.output
    return root


def saved_points_and_reports(bundle: Path) -> tuple[set[str], set[str]]:
    points = {point.name for point in Manifest.load(bundle, verify_hashes=False).operating_points}
    reports = bundle / REPORTS_DIR
    return points, {path.name for path in reports.iterdir()} if reports.is_dir() else set()


def test_the_readme_has_snippets_and_commands_to_check():
    assert python_snippets() and {line.split()[0] for line in command_lines()} == set(COMMANDS)


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_python_snippets_run_as_written(demo_layout, monkeypatch, index):
    monkeypatch.chdir(demo_layout)
    exec(compile(python_snippets()[index], f"README.md python block {index + 1}", "exec"), {})


def test_commands_run_as_written_in_readme_order_and_lose_nothing(demo_layout, monkeypatch):
    monkeypatch.chdir(demo_layout)
    kept_points, kept_reports = saved_points_and_reports(DEMO_BUNDLE)
    assert {"demo"} <= kept_points and kept_reports == {"demo"}
    for line in command_lines():
        program, *arguments = shlex.split(line, comments=True)
        result = CliRunner().invoke(COMMANDS[program], arguments)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        points, reports = saved_points_and_reports(DEMO_BUNDLE)
        assert kept_points <= points and kept_reports <= reports, (
            f"{line} lost {kept_points - points or kept_reports - reports}"
        )
        kept_points, kept_reports = points, reports
    assert {"demo", "speedup-0.50", "quality"} <= kept_points and {
        "demo",
        "speedup-0.50",
        "quality",
    } <= kept_reports
