"""`pcee-serve`: an ASGI server around one early-exit runtime (Open Inference Protocol v2, /v1/classify).

    from pcee.serving import ServerSettings, create_app
    app = create_app(ServerSettings(model_name="sst2"), lambda: EarlyExitRuntime.from_bundle("runs/sst2-pcee"))

Torch-free like the runtime: it imports `pcee.runtime` only, never a backend module.
"""

from .app import create_app
from .errors import (
    BadRequest,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServingError,
    Unauthorized,
    Unavailable,
)
from .service import InferenceService
from .settings import ServerSettings

__all__ = [
    "create_app",
    "InferenceService",
    "ServerSettings",
    "BadRequest",
    "GatewayTimeout",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "ServingError",
    "Unauthorized",
    "Unavailable",
]
