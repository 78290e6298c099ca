"""PCEE early-exit runtime: torch-free (numpy, tokenizers, onnxruntime or TensorRT).

    from pcee.runtime import EarlyExitRuntime
    runtime = EarlyExitRuntime.from_bundle("runs/sst2-pcee")
    result = runtime.predict(["a gripping, funny film"])
"""

from .engine import AllExits, EarlyExitRuntime, PredictionResult, RowPrediction
from .errors import BackendError, BackendUnavailableError, BundleError, InputError, PceeError, PolicyError
from .manifest import FORMAT_VERSION, Manifest
from .policies import POLICY_NAMES, ExitPolicy, OperatingPoint, build_policy

__all__ = [
    "AllExits", "EarlyExitRuntime", "PredictionResult", "RowPrediction",
    "BackendError", "BackendUnavailableError", "BundleError", "InputError", "PceeError", "PolicyError",
    "FORMAT_VERSION", "Manifest", "POLICY_NAMES", "ExitPolicy", "OperatingPoint", "build_policy",
]
