"""What servers import stays light: no torch or transformers in the runtime, nothing GPU-only at import."""

import subprocess
import sys

import pytest

CASES = {
    "runtime": (
        ["pcee.runtime", "pcee.runtime.cli", "pcee.runtime.backends.onnxruntime_cpu"],
        ["torch", "transformers"],
    ),
    "calibration": (
        ["pcee.calibration.cli", "pcee.calibration.report"],
        ["torch", "transformers", "matplotlib"],
    ),
    "serving": (["pcee.serving", "pcee.serving.cli"], ["torch", "transformers", "tensorrt"]),
    "gpu backends": (
        ["pcee.runtime.backends.tensorrt", "pcee.runtime.backends.onnxruntime_cuda"],
        ["torch", "tensorrt", "cuda"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_modules_do_not_import_heavy_packages(case):
    modules, forbidden = CASES[case]
    check = (
        f"import sys, {', '.join(modules)}\n"
        f"print(','.join(sorted(n for n in sys.modules if n.split('.')[0] in {forbidden!r})))"
    )
    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "", f"{case} imported: {completed.stdout.strip()}"
