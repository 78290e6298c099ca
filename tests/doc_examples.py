"""The README's and docs' examples, read out of the markdown and run on the demo's output layout.

Shared by tests/test_docs_readme.py and tests/test_docs.py. The layout stands in for what `pcee-demo` writes,
in a scratch directory: a tiny random SST-2 model at `runs/demo/sst2`, its bundle at
`runs/demo/sst2-pcee` with the demo's own ladder of points (saved by the demo's `save_ladder`, so
`full`, `speedup-0.50`, `speedup-0.75` and their calibration reports), `runs/demo/reviews.txt` as the
demo writes it, and the shipped data as `demo/data`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import make_tiny_model_dir

from pcee.calibration.cli import calibrate_main, eval_main
from pcee.demo.cli import save_ladder, write_reviews
from pcee.exporter.bundle import ExportOptions, export_bundle
from pcee.runtime.cli import main as predict_main

ROOT = Path(__file__).resolve().parents[1]
DEMO_WORKDIR = Path("runs/demo")
DEMO_MODEL, DEMO_BUNDLE = DEMO_WORKDIR / "sst2", DEMO_WORKDIR / "sst2-pcee"
# The commands run in-process, in the order a doc gives them.
COMMANDS = {"pcee-predict": predict_main, "pcee-calibrate": calibrate_main, "pcee-eval": eval_main}
POINT_OPTIONS = ("--point", "--operating-point", "--holdout-of", "--adaptive-points", "--name")


def doc_text(name: str) -> str:
    return (ROOT / name).read_text()


def python_snippets(text: str) -> list[str]:
    """Every ```python block."""
    return re.findall(r"```python\n(.*?)```", text, re.S)


def shell_commands(text: str, indented: bool = True) -> list[str]:
    """Every command of the shell examples, in order: the indented code blocks (unless not `indented`) and
    the ```bash / ``` fenced ones. A command continued by a trailing backslash or an open quote is joined
    into one; comments stay (shlex drops them)."""
    commands, pending = [], ""
    for line in shell_example_lines(text, indented):
        pending = f"{pending}\n{line}" if pending else line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on below
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending.strip())
        pending = ""
    return commands


def shell_example_lines(text: str, indented: bool = True) -> list[str]:
    lines, fence = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("", "bash", "sh", "console"):
            lines.append(line)
        elif indented and fence is None and line.startswith("    ") and line.strip():
            lines.append(line.strip())
    return lines


def on_test_ports(text: str, addresses: dict[int, str]) -> str:
    """`text` with each `localhost:PORT` whose PORT is a key of `addresses` (a server's documented default
    port) pointed at the test's `host:port` for it: a test serves on free ports, not the defaults."""
    return re.sub(
        r"\b(?:localhost|127\.0\.0\.1):(\d+)\b", lambda match: addresses.get(int(match[1]), match[0]), text
    )


def program_of(command: str) -> str:
    """The program a command runs, past `VAR=value` and `taskset -c N` prefixes."""
    words = shlex.split(command, comments=True)
    while words and ("=" in words[0] or words[0] == "taskset"):
        words = words[3:] if words[0] == "taskset" else words[1:]
    return words[0] if words else ""


def commands_of(text: str, *programs: str) -> list[str]:
    return [command for command in shell_commands(text) if program_of(command) in programs]


def point_names_used(text: str) -> set[str]:
    """Saved point names the examples ask for: options of the commands, and names in JSON and Python."""
    names = set()
    for command in shell_commands(text):
        words = shlex.split(command, comments=True)
        for option, value in zip(words, words[1:]):
            if option in POINT_OPTIONS:
                names.update(value.split(","))
    for snippet in [*python_snippets(text), *shell_commands(text)]:
        names.update(re.findall(r'"operating_point":\s*"([^"]+)"', snippet))
        names.update(re.findall(r'set_operating_point\("([^"]+)"\)', snippet))
    return names


def point_names_created(text: str) -> set[str]:
    """Points a doc's own pcee-calibrate lines save (`--name`, else the default `speedup-S`)."""
    names = set()
    for command in commands_of(text, "pcee-calibrate"):
        words = shlex.split(command, comments=True)
        if "--dry-run" in words:
            continue
        if "--name" in words:
            names.add(words[words.index("--name") + 1])
        elif "--target-speedup" in words:
            target = words[words.index("--target-speedup") + 1]
            names.update(f"speedup-{float(target):.2f}" for _ in [0] if re.fullmatch(r"[\d.]+", target))
    return names


def run_paths(text: str) -> set[str]:
    """Every `runs/...` path the examples name."""
    return set(re.findall(r"(?<![\w/])runs/[\w.-]+(?:/[\w.-]+)*", "\n".join(shell_commands(text))))


def build_demo_layout(root: Path) -> tuple[str, ...]:
    """What `pcee-demo` writes, under `root`, from a tiny model; returns the ladder of saved points."""
    model_dir = make_tiny_model_dir(
        root / "models", task="sst2", label_names=["negative", "positive"], num_layers=6
    )
    shutil.copytree(model_dir, root / DEMO_MODEL)
    bundle = export_bundle(root / DEMO_MODEL, root / DEMO_BUNDLE, ExportOptions()).bundle_dir
    shutil.copytree(ROOT / "demo" / "data", root / "demo" / "data")
    write_reviews(root / DEMO_WORKDIR)
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.chdir(root)
        return save_ladder(bundle.relative_to(root), ["--data", "demo/data", "--task", "sst2"], 0.5)


def run_command(command: str, commands: dict | None = None) -> str:
    """One of `commands` (default COMMANDS) as written, in the current directory; fails the test with its
    output unless it exits 0."""
    program, *arguments = shlex.split(command, comments=True)
    result = CliRunner().invoke((commands or COMMANDS)[program], arguments)
    assert result.exit_code == 0, f"{command}\n{result.output}"
    return result.output


def run_shell(command: str) -> str:
    """A shell line as written, in the current directory; fails the test with its output unless it exits 0."""
    completed = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"{command}\n{completed.stdout}{completed.stderr}"
    return completed.stdout
