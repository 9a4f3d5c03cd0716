"""Connection hygiene under abuse: idle and half-sent connections never pile up.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but nothing
bounds a connection that sends nothing, or half a request head (slowloris), and
its ``limit_concurrency`` answers plain text. This protocol adds:

* a head timeout: a request head must be complete within ``header_timeout`` of the
  connection opening (or of the previous response), else 408 and close;
* a connection cap: at ``max_connections`` the oldest connection with no request
  in progress (idle keep-alive, or still waiting for a head) is closed to make
  room, so probes and real clients still get in during a flood; only when every
  connection is busy with a request is the new one refused with an OpenAI-shaped
  503;
* ``scope["extensions"]["nebula.abort"]``: lets a response drop a connection whose
  client stopped reading (closing would wait for a flush that never comes);
* ``scope["extensions"]["nebula.flow"]``: uvicorn's flow control, whose
  ``write_paused`` says whether the next ``send`` can wait at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nebula.errors import RequestTimeout, Unavailable

log = logging.getLogger(__name__)


def _canned(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


_TIMEOUT = _canned(
    "408 Request Timeout", RequestTimeout("request head not received in time").to_json()
)
_FULL = _canned(
    "503 Service Unavailable",
    Unavailable("too many open connections; retry shortly").to_json(),
)


class ConnectionGuard:
    """Per-server state (never global): who is waiting for a head, since when."""

    def __init__(self, *, header_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.waiting: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.open = 0
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    def protocol(self, *args: Any, **kwargs: Any) -> GuardedProtocol:
        return GuardedProtocol(*args, guard=self, **kwargs)


class GuardedProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        g = self.guard
        g.open += 1
        if g.open > g.max_connections:
            if g.waiting:  # make room: drop the connection idle longest before its head
                oldest, _ = g.waiting.popitem(last=False)
                oldest._drop(b"")
                g.evicted += 1
            else:
                g.refused += 1
                self.transport.write(_FULL)
                self.transport.close()
                return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.open -= 1
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        ext: dict[str, Any] = {"nebula.abort": self.transport.abort, "nebula.flow": self.flow}
        self.scope["extensions"] = ext
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        idle = not self.pipeline
        super().on_response_complete()
        # Idle keep-alive from here on, bounded by uvicorn's own timer, but first in
        # line to make room at the cap; a new head must arrive in time too:
        # on_message_begin arms the head timer.
        if idle and not self.transport.is_closing():
            self.guard.waiting[self] = None

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.guard.header_timeout, self._head_timeout)
        self.guard.waiting[self] = None
        self.guard.waiting.move_to_end(self)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.guard.waiting.pop(self, None)

    def _head_timeout(self) -> None:
        self._head_timer = None
        self.guard.timed_out += 1
        self._drop(_TIMEOUT)

    def _drop(self, answer: bytes) -> None:
        self._disarm()
        if not self.transport.is_closing():
            if answer and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(answer)
            self.transport.close()
