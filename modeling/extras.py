"""What the torch side of pcee needs installed, checked without importing it."""

from __future__ import annotations

from pcee.runtime import require_extra

EXPORT_MODULES = ("torch", "transformers", "onnx", "safetensors")


def require_export_extras(command: str) -> None:
    """Fail in one line, before importing torch, on a runtime-only install (`pip install pcee`)."""
    require_extra(command, EXPORT_MODULES, "'pcee[export]'")
