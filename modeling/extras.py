"""What the torch side of pcee needs installed, checked without importing it."""

from __future__ import annotations

import importlib.util

import click

EXPORT_MODULES = ("torch", "transformers", "onnx", "safetensors")


def require_export_extras(command: str) -> None:
    """Fail in one line, before importing torch, on a runtime-only install (`pip install pcee`)."""
    missing = [name for name in EXPORT_MODULES if not is_importable(name)]
    if missing:
        raise click.ClickException(
            f"{command} needs {', '.join(missing)}, which this installation lacks (plain `pip install pcee` is the "
            "torch-free runtime). Install the exporter's dependencies: pip install 'pcee[export]'"
        )


def is_importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken package, or one blocked with sys.modules[name] = None
        return False
