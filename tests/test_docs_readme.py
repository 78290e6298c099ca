"""The README's snippets and commands run as written on the demo's output layout, and lose nothing of it.

The layout (tests/doc_examples.py) is what `pcee-demo` leaves behind, from a tiny SST-2 model: the model
at `runs/demo/sst2`, its bundle at `runs/demo/sst2-pcee` with the demo's saved points and their reports,
the demo's data as `demo/data`. The Python snippets are executed; the pcee-export, pcee-predict,
pcee-calibrate and pcee-eval lines are run in the order the README gives them, and every saved point and
report must survive to the end. (pcee-train, pcee-bench and pcee-demo lines need the real backbone and
minutes of work: the demo test and the CLI tests cover them.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_examples import (
    COMMANDS,
    DEMO_BUNDLE,
    build_demo_layout,
    commands_of,
    doc_text,
    python_snippets,
    run_command,
)

from pcee.exporter.cli import main as export_main
from pcee.runtime import REPORTS_DIR, Manifest

README = doc_text("README.md")
README_COMMANDS = {"pcee-export": export_main, **COMMANDS}


def command_lines() -> list[str]:
    """README commands of README_COMMANDS on the demo's output, in README order."""
    return [line for line in commands_of(README, *README_COMMANDS) if "runs/demo/" in line]


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    root = tmp_path_factory.mktemp("readme")
    return root, build_demo_layout(root)


def saved_points_and_reports(bundle: Path) -> tuple[set[str], set[str]]:
    points = {point.name for point in Manifest.load(bundle, verify_hashes=False).operating_points}
    reports = bundle / REPORTS_DIR
    return points, {path.name for path in reports.iterdir()} if reports.is_dir() else set()


def test_the_readme_has_snippets_and_commands_to_check():
    assert python_snippets(README) and {line.split()[0] for line in command_lines()} == set(README_COMMANDS)


@pytest.mark.parametrize("index", range(len(python_snippets(README))))
def test_python_snippets_run_as_written(demo_layout, monkeypatch, index):
    monkeypatch.chdir(demo_layout[0])
    exec(compile(python_snippets(README)[index], f"README.md python block {index + 1}", "exec"), {})


def test_commands_run_as_written_in_readme_order_and_lose_nothing(demo_layout, monkeypatch):
    root, ladder = demo_layout
    monkeypatch.chdir(root)
    kept_points, kept_reports = saved_points_and_reports(DEMO_BUNDLE)
    calibrated = set(ladder) - {"full"}
    assert set(ladder) <= kept_points and kept_reports == calibrated
    for line in command_lines():
        run_command(line, README_COMMANDS)
        points, reports = saved_points_and_reports(DEMO_BUNDLE)
        assert kept_points <= points and kept_reports <= reports, (
            f"{line} lost {kept_points - points or kept_reports - reports}"
        )
        kept_points, kept_reports = points, reports
    assert {*ladder, "quality"} <= kept_points and {*calibrated, "quality"} <= kept_reports
