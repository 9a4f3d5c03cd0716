"""A lean HTTP/1.1 client for the `openai` bridge: persistent connections, C parsing.

The bridge's hot path is one POST per job and a stream of small SSE events back. A
general client (httpx over h11, pure Python) spent milliseconds of CPU per streamed
request on that; this one keeps a pool of keep-alive connections as asyncio
protocols and lets httptools (llhttp, the parser uvicorn uses) frame responses, so
the per-event cost is one C parser callback and a list append.

Scope, on purpose: HTTP/1.1 over TCP or TLS, JSON request bodies, responses without
content coding (no ``Accept-Encoding`` is sent), no proxies and no redirects: what
OpenAI-compatible servers and cloud APIs answer to. Backpressure is end to end: while
the reader lags more than ``_HIGH_WATER`` bytes behind, the socket stops being read,
so the upstream's sends block instead of this process buffering its output.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools

from nebula.errors import InvalidRequest

_HIGH_WATER = 256 * 1024


class UpstreamClosed(ConnectionError):
    """The connection ended before a complete response (or the pool is closed)."""

    def __init__(self, message: str, *, before_response: bool = False) -> None:
        super().__init__(message)
        # Nothing of a response arrived: a request on a reused keep-alive connection
        # may be sent again on a fresh one (the server closed it while idle).
        self.before_response = before_response


class Connection(asyncio.Protocol):
    """One keep-alive connection; serves one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self._headers_done = False
        self._keep_alive = False
        self._complete = False
        self._eof_body = True  # no Content-Length and not chunked: the body ends at EOF
        self._got_bytes = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._complete:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamClosed(f"upstream sent invalid HTTP: {e}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and self._eof_body and not self._complete:
            self._complete = True  # a close-delimited body ends here
            self._wake()
        elif not self._complete:
            why = f": {exc}" if exc else ""
            self._fail(
                UpstreamClosed(
                    f"upstream closed the connection mid-response{why}",
                    before_response=not self._got_bytes,
                )
            )

    # --- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-length" or (
            lname == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._eof_body = False

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim response (103 Early Hints): the real one follows
            self._eof_body = True
            return
        self.status = status
        # Asked now: llhttp forgets the message's flags once it completes.
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done:
            self._complete = True
            self._wake()

    # --- used by the pool and the bridge --------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        self._wake()

    async def _wait(self, timeout: float) -> None:
        self._waiter = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError:
            raise TimeoutError(f"upstream sent nothing for {timeout:g}s") from None
        finally:
            self._waiter = None

    def send(self, request: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamClosed("connection already closed", before_response=True)
        self._reset()
        self.transport.write(request)

    async def response_start(self, timeout: float) -> int:
        """Wait for the status line and headers; returns the status."""
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait(timeout)
        return self.status

    async def read(self, timeout: float) -> bytes | None:
        """The body bytes received since the last call (waiting for some); None at its end."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait(timeout)

    async def read_all(self, timeout: float) -> bytes:
        parts = []
        while (data := await self.read(timeout)) is not None:
            parts.append(data)
        return b"".join(parts)

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read."""
        return self._buffered

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and not self.closed
            and not self._chunks
            and self._keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one origin; ``request`` picks or opens one."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        connect_timeout: float = 10.0,
        max_idle: int = 64,
    ) -> None:
        u = urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InvalidRequest(
                f"upstream URL must be http:// or https://, got {base_url!r}", param="upstream_url"
            )
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base_path = u.path.encode()
        self._ssl = ssl.create_default_context() if u.scheme == "https" else None
        default_port = self.port == (443 if u.scheme == "https" else 80)
        host = self.host if ":" not in self.host else f"[{self.host}]"
        authority = host if default_port else f"{host}:{self.port}"
        headers = headers or {}
        if any(c in f"{k}{v}" for k, v in headers.items() for c in "\r\n\0"):
            raise InvalidRequest(
                "upstream header names and values (the API key) must be single-line text",
                param="upstream_api_key",
            )
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head_tail = (
            f" HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: nebula-bridge\r\n{extra}"
        ).encode()
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list[Connection] = []
        self.busy: set[Connection] = set()  # exchanges under way (observable in tests)
        self._closed = False

    def build(
        self, method: bytes, path: bytes, body: bytes | None = None, headers: bytes = b""
    ) -> bytes:
        """``headers``: extra ``Name: value\r\n`` lines, already checked by the caller."""
        head = method + b" " + self.base_path + path + self._head_tail + headers
        if body is None:
            return head + b"\r\n"
        return (
            head
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise TimeoutError(
                f"connecting to {self.host}:{self.port} took over {self.connect_timeout:g}s"
            ) from None
        return conn

    async def request(self, request: bytes, timeout: float) -> Connection:
        """Send ``request``; returns its connection once the response headers are in.

        The caller reads the body, then hands the connection back with ``release``
        (always, also on errors: an unfinished exchange closes it)."""
        if self._closed:
            raise UpstreamClosed("the upstream pool is closed")
        conn = await self._request(request, timeout)
        self.busy.add(conn)
        return conn

    async def _request(self, request: bytes, timeout: float) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            try:
                conn.send(request)
                await conn.response_start(timeout)
                return conn
            except UpstreamClosed as e:
                conn.close()
                if not e.before_response:
                    raise
            except BaseException:
                conn.close()
                raise
            # The server dropped this idle connection as we sent: retry on another.
        conn = await self._open()
        try:
            conn.send(request)
            await conn.response_start(timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, conn: Connection) -> None:
        self.busy.discard(conn)
        if conn.reusable and not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle + list(self.busy):
            conn.close()
        await asyncio.sleep(0)  # let the transports run their close callbacks
