"""Artefacts for inference servers that are not ours: a Triton Inference Server model repository.

    from pcee.deploy import TritonOptions, write_triton_repository
    model_dir = write_triton_repository("runs/demo/sst2-pcee", "runs/demo/triton", TritonOptions())

The model it writes imports `pcee.runtime` and nothing of torch; `pcee-triton` is the CLI.
"""

from .errors import DeployError
from .repository import KINDS, TritonOptions, TritonRepository, write_triton_repository

__all__ = ["DeployError", "KINDS", "TritonOptions", "TritonRepository", "write_triton_repository"]
