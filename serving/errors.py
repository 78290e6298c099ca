"""HTTP-facing errors: each carries the status it is answered with and the headers that go with it."""

from __future__ import annotations

from pcee.runtime import PceeError


class ServingError(PceeError):
    """A request the server answers with an error status; the message becomes `{"error": message}`."""

    status = 500

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ServingError, ValueError):
    status = 400


class Unauthorized(ServingError):
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="pcee-admin"'}


class NotFound(ServingError):
    status = 404


class Conflict(ServingError):
    status = 409


class RequestTimeout(ServingError):
    status = 408

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class PayloadTooLarge(ServingError):
    status = 413

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class ClientClosedRequest(ServingError):
    """The client went away mid-body; nobody reads the answer, 499 (nginx's code) only labels the metric."""

    status = 499


class Unavailable(ServingError):
    """Overloaded, loading, or shutting down: worth retrying after `retry_after_seconds`.

    `close`: also end the connection (a draining server sends clients to another replica).
    """

    status = 503

    def __init__(self, message: str, retry_after_seconds: int = 1, close: bool = False):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.close = close

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after_seconds)}
        if self.close:
            headers["Connection"] = "close"
        return headers


class GatewayTimeout(ServingError):
    """The request's own deadline passed before its rows could run (nothing ran for it)."""

    status = 504
