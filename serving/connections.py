"""The HTTP connection layer under the app: limits uvicorn does not set, and protocol errors as JSON.

uvicorn's httptools protocol reads request heads of any size, keeps a connection that never sends
a request open for ever, and answers a request it cannot parse with plain text. This subclass adds,
per connection:

- a head size limit: a request line plus headers past `max_header_bytes` gets 431 and the
  connection is closed (so a 100 MB header costs at most the limit plus one read);
- a head timeout: a connection that has not sent a complete request head within `header_timeout_s`
  of connecting (or of starting its next request) is closed, with a 408 if part of a head came;
- a connection limit: past `max_connections` open connections, a new one gets 503 and is closed;
- every protocol-level error answered as `{"error": ...}` JSON;
- each request's arrival: the monotonic time its first bytes were read, in the ASGI scope under
  `ARRIVED_AT`, so the app's deadlines count the time a request waited before the app saw it.

Idle keep-alive connections are closed after uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("pcee.serving")

# The ASGI scope key of a request's arrival (time.monotonic() when its first bytes were read).
ARRIVED_AT = "pcee.arrived_at"


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head past the limit (httptools wraps it)."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("header_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")


def raw_json_response(status: int, message: str, extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written straight to the socket."""
    body = json.dumps({"error": message}).encode("ascii")
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in extra_headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `limits` (set on a subclass by `protocol_with`)."""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.in_head, self.head_bytes, self.head_timer = True, 0, None
        self.head_size = 0  # the parsed head's bytes so far: a head that arrives in one read is measured too
        if len(self.connections) > self.limits.max_connections:
            self.reject(
                503,
                f"this server holds at most {self.limits.max_connections} connections (--max-connections); retry shortly",
                (("retry-after", "1"),),
            )
            return
        self.arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.read_at = time.monotonic()  # a request that begins in this read arrived now
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_timer is None:
                self.arm_head_timer()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as error:
            if isinstance(error.__cause__ or error.__context__, HeadTooLarge):
                self.reject_large_head()
            else:
                self.reject(400, f"invalid HTTP request: {error}")
            return
        if self.in_head and self.head_bytes > self.limits.max_header_bytes:  # a head still arriving
            self.reject_large_head()

    def reject_large_head(self) -> None:
        self.reject(
            431,
            f"the request line and headers are over {self.limits.max_header_bytes} bytes (--max-header-bytes)",
        )

    def on_message_begin(self) -> None:
        self.head_size = 0
        super().on_message_begin()
        self.scope[ARRIVED_AT] = self.read_at  # type: ignore[literal-required]

    def on_url(self, url: bytes) -> None:
        self.grow_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.grow_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def grow_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > self.limits.max_header_bytes:
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        self.in_head, self.head_bytes = False, 0
        self.disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head = True  # whatever comes next is the next request's head

    def send_400_response(self, msg: str) -> None:
        self.reject(400, f"invalid HTTP request: {msg}")

    # -- the head timer -----------------------------------------------------------------------------
    def arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self.head_timed_out)

    def disarm_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.in_head:
            return
        if self.head_bytes:
            self.reject(
                408,
                f"the request line and headers did not arrive within {self.limits.header_timeout_s:g} s (--header-timeout-s)",
            )
        else:
            self.transport.close()

    def reject(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer with JSON and close; mid-response (a pipelined request) there is no room to answer: just close."""
        log.warning("closing a connection from %s: %d %s", self.client_label(), status, message)
        self.disarm_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(raw_json_response(status, message, headers))
        self.transport.close()

    def client_label(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def protocol_with(limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn builds per connection (it passes only its config), with these limits."""
    return type("PceeHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})


def uvicorn_options(limits: ConnectionLimits) -> dict:
    """What `uvicorn.Config` takes to run the guarded protocol with these limits (no WebSockets are served)."""
    return {"http": protocol_with(limits), "ws": "none", "timeout_keep_alive": limits.keep_alive_timeout_s}
