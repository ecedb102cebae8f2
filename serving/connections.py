"""A cap on the HTTP connections a replica holds, in front of aiohttp's protocol.

aiohttp accepts every connection, and each holds a file descriptor until its client or a
timeout closes it: a flood of slow clients once held about 20,000 sockets and ran the process
out of file descriptors. ``ConnectionGate`` is the listening socket's protocol factory. The first
``limit`` open connections go to aiohttp; past that, a connection gets a 503 that says why, and
is closed once its client has read it (or after ``REFUSAL_LINGER_S``). Each refusal is counted
(``streamrec_serving_connections_refused_total``) and a spell of them is logged once when it
starts and once when it ends. The timeouts that free held connections are aiohttp's and the
API's (``serving.app``).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson

from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

# How long a refused connection stays open for its client to read the 503 and close first (a
# socket closed with unread request bytes sends a reset, which can destroy the answer in flight).
REFUSAL_LINGER_S = 1.0


class ConnectionGate:
    """Protocol factory: ``server()`` (aiohttp's) for up to ``limit`` open connections, a 503 past it.

    Refusals waiting to close are bounded by ``limit`` too; beyond that a connection is reset
    without an answer, so a flood holds at most twice ``limit`` sockets.
    """

    def __init__(self, server: Callable[[], asyncio.Protocol], limit: int, metrics: ServingMetrics) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.server = server
        self.limit = limit
        self.metrics = metrics
        self.open = 0
        self._refusing: set[asyncio.Transport] = set()
        self._refused_in_spell = 0
        self._answer = _refusal(limit)
        metrics.connections.set_function(lambda: self.open)

    def __call__(self) -> asyncio.Protocol:
        return _Gated(self)

    def admit(self) -> bool:
        """Whether one more connection may go to aiohttp (counting it open if so)."""
        if self.open < self.limit:
            self.open += 1
            return True
        return False

    def closed(self) -> None:
        """An admitted connection closed."""
        self.open -= 1
        if self._refused_in_spell and self.open < self.limit:
            log.info("back under the cap of %d connections after refusing %d", self.limit, self._refused_in_spell)
            self._refused_in_spell = 0

    def refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 on ``transport``, close our side, and close it all once the client has."""
        self.metrics.connections_refused.inc()
        if not self._refused_in_spell:
            log.warning("%d connections open, the cap (--max-connections): refusing new ones with 503 until some "
                        "close", self.open)
        self._refused_in_spell += 1
        if len(self._refusing) >= self.limit:
            transport.abort()
            return
        self._refusing.add(transport)
        transport.write(self._answer)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def forget(self, transport: asyncio.BaseTransport) -> None:
        """A refused connection closed."""
        self._refusing.discard(transport)

    def close(self) -> None:
        """Reset the refused connections still lingering (the server is stopping)."""
        for transport in list(self._refusing):
            transport.abort()


def _refusal(limit: int) -> bytes:
    body = orjson.dumps({"error": f"too many connections: this replica holds {limit}, its cap; retry later"})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


class _Gated(asyncio.Protocol):
    """One connection: aiohttp's protocol when admitted, else a refusal that drops what it reads."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._gate.admit():
            self._inner = self._gate.server()
            self._inner.connection_made(transport)
        else:
            self._gate.refuse(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._gate.closed()
            self._inner.connection_lost(exc)
        else:
            self._gate.forget(self._transport)
