"""`pcee-serve`'s entry point: on an install without `pcee[serve]` it says so in one line (also for --help),
before anything imports starlette, uvicorn or prometheus-client."""

from __future__ import annotations

import click

from pcee.runtime import require_extra

SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client")


def main() -> None:
    try:
        require_extra("pcee-serve", SERVE_MODULES, "'pcee[serve]'")
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from None
    from .cli import main as serve

    serve()
