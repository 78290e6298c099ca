"""benchmarks/gpu_check.py where no GPU is: its dry run, and a verdict that is ok only when a GPU backend stage ran.

The stages themselves need a GPU; their checks run here on the software GPU in test_runtime_gpu_backends.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pcee.benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BACKEND_STAGES = [f"backends/{name}" for name in gpu_check.GPU_BACKENDS]


def run_script(*arguments: str) -> tuple[int, dict]:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    return completed.returncode, json.loads(completed.stdout)


def test_dry_run_lists_every_stage_and_why_it_would_be_skipped():
    returncode, report = run_script("--dry-run")
    assert returncode == 0 and report["dry_run"] is True
    stages = {entry["stage"]: entry for entry in report["stages"]}
    assert list(stages) == [stage.name for stage in gpu_check.STAGES]
    assert set(BACKEND_STAGES) <= set(stages)
    for entry in stages.values():
        assert entry["checks"] and entry["would"] in ("run", "skip")
        assert (entry["would"] == "skip") == bool(entry["needs"])
    if gpu_check.missing_cuda():  # this machine: no GPU, so no GPU stage would run, each saying why
        assert (
            all(stages[name]["would"] == "skip" for name in BACKEND_STAGES) and report["would_be_ok"] is False
        )
        assert any("cuda-python" in need or "GPU" in need for need in stages["device_memory"]["needs"])
    assert report["seconds"] < 60  # nothing was built or run


def test_a_run_where_no_gpu_backend_ran_is_not_ok(tmp_path, four_layer_bundle):
    """Every stage is reported; with every GPU backend stage skipped the script says so and exits 1."""
    pytest.importorskip("torch", reason="building the bundle needs the export extras")
    if not gpu_check.missing_cuda():
        pytest.skip("this machine has a GPU: the GPU stages would run")
    bundle = four_layer_bundle
    returncode, report = run_script(
        "--bundle", str(bundle), "--work-dir", str(tmp_path / "work"), "--no-pytest", "--texts", "8"
    )
    assert (
        returncode == 1
        and report["ok"] is False
        and report["gpu_backends_ran"] == []
        and report["failed_stages"] == []
    )
    assert report["bundle"]["status"] == "ran"
    for name in gpu_check.GPU_BACKENDS:
        stage = report["backends"][name]
        assert stage["status"] == "skipped" and stage["reason"]


def summary_with(**statuses: str) -> dict:
    summary: dict = {"backends": {}}
    for name, status in statuses.items():
        target = summary["backends"] if name in gpu_check.GPU_BACKENDS else summary
        target[name] = {"status": status}
    return summary


@pytest.mark.parametrize(
    ("statuses", "ok"),
    [
        (
            {
                "environment": "ran",
                "bundle": "ran",
                "tensorrt": "skipped",
                "onnxruntime-cuda": "skipped",
                gpu_check.EMULATED: "skipped",
            },
            False,
        ),
        (
            {"environment": "ran", "device_memory": "ran", "pytest_gpu": "ran"},
            False,
        ),  # GPU helpers only: no backend checked
        ({"bundle": "ran", "tensorrt": "skipped", gpu_check.EMULATED: "ran"}, True),
        ({"tensorrt": "ran", "pytest_gpu": "failed"}, False),
        ({"tensorrt": "ran", "onnxruntime-cuda": "failed"}, False),
    ],
    ids=[
        "all-backends-skipped",
        "no-backend-stage",
        "emulated-ran",
        "another-stage-failed",
        "a-backend-failed",
    ],
)
def test_ok_only_when_a_gpu_backend_stage_ran_and_nothing_failed(statuses, ok):
    verdict = gpu_check.verdict(summary_with(**statuses))
    assert verdict["ok"] is ok
    assert verdict["gpu_backends_ran"] == [
        name for name in gpu_check.GPU_BACKENDS if statuses.get(name) == "ran"
    ]


def test_each_stage_is_recorded_as_ran_skipped_or_failed():
    def skipped() -> dict:
        raise gpu_check.Skipped("needs an NVIDIA GPU")

    def broken() -> dict:
        raise ValueError("boom")

    summary: dict = {}
    assert gpu_check.run_stage(summary, "good", lambda: {"passed": True, "value": 1}) == {
        "passed": True,
        "value": 1,
    }
    assert gpu_check.run_stage(summary, "mismatch", lambda: {"passed": False}) is None
    assert gpu_check.run_stage(summary, "skipped", skipped) is None
    assert gpu_check.run_stage(summary, "broken", broken) is None
    assert {name: stage["status"] for name, stage in summary.items()} == {
        "good": "ran",
        "mismatch": "failed",
        "skipped": "skipped",
        "broken": "failed",
    }
    assert (
        summary["skipped"]["reason"] == "needs an NVIDIA GPU"
        and "ValueError: boom" in summary["broken"]["error"]
    )
