"""Optional extras: an entry point that needs one says which, in one line, before importing it."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import click


def is_importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken package, or one blocked with sys.modules[name] = None
        return False


def require_extra(command: str, modules: Sequence[str], install: str) -> None:
    """Fail in one line naming the missing modules and the `pip install` that brings them."""
    missing = [name for name in modules if not is_importable(name)]
    if missing:
        raise click.ClickException(
            f"{command} needs {', '.join(missing)}, which this installation lacks (plain `pip install pcee` is "
            f"the torch-free runtime). Install it: pip install {install}"
        )
