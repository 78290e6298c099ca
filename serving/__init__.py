"""`pcee-serve`: an ASGI server around one early-exit runtime (Open Inference Protocol v2, /v1/classify).

    from pcee.serving import ServerSettings, create_app
    app = create_app(ServerSettings(model_name="sst2"), lambda: EarlyExitRuntime.from_bundle("runs/sst2-pcee"))

Torch-free like the runtime: it imports `pcee.runtime` only, never a backend module.
"""

from __future__ import annotations

import importlib

# Imported on first use, so `pcee-serve` can name the missing extra before starlette is needed.
MODULE_OF = {
    "create_app": "app",
    "InferenceService": "service",
    "ServerSettings": "settings",
    **{
        name: "errors"
        for name in (
            "BadRequest",
            "GatewayTimeout",
            "NotFound",
            "PayloadTooLarge",
            "RequestTimeout",
            "ServingError",
            "Unauthorized",
            "Unavailable",
        )
    },
}
__all__ = list(MODULE_OF)


def __getattr__(name: str):
    if name not in MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{MODULE_OF[name]}", __name__), name)
