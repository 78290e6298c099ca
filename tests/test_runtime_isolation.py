"""The runtime is what servers import: it must never pull in torch or transformers."""

import subprocess
import sys

CHECK = """
import sys
import pcee.runtime
import pcee.runtime.cli
import pcee.runtime.backends.onnxruntime_cpu
import pcee.calibration
heavy = sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers'))
print(','.join(heavy))
"""


def test_runtime_never_imports_torch_or_transformers():
    completed = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "", f"runtime imported: {completed.stdout.strip()}"
