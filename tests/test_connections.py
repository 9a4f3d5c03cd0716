"""Connection hygiene: idle and half-sent connections are timed out, a flood never
locks out probes, connections beyond the cap get an OpenAI-shaped 503, and clients
that leave mid-request leave one log line at most."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket

import httpx
import pytest

from tests.conftest import Fabric, until

MSG = [{"role": "user", "content": "hello"}]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _fd_headroom() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _open(port: int, n: int, head: bytes = b"") -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        if head:
            await loop.sock_sendall(s, head)
        out.append(s)
    return out


def _closed_by_server(s: socket.socket) -> bool:
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 408")


async def test_flood_of_idle_and_half_sent_connections(fabric: Fabric) -> None:
    gw = await fabric.gateway(header_timeout=1.0, max_connections=1000)
    assert gw.guard is not None
    baseline = _fds()
    socks: list[socket.socket] = []
    try:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as http:
            for _ in range(5):  # bounded: 2,500 idle and 500 half-sent heads
                socks += await _open(gw.port, 500)
                assert (await http.get("/ready")).status_code == 200
            socks += await _open(gw.port, 500, head=b"POST /v1/chat/completions HTTP/1.1\r\nHo")
            assert (await http.get("/ready")).status_code == 200
        # The oldest were evicted to make room; the rest time out within header_timeout.
        await until(lambda: all(_closed_by_server(s) for s in socks), 15)
        assert gw.guard.evicted >= 2000 and gw.guard.timed_out >= 1
    finally:
        for s in socks:
            s.close()
    await until(lambda: gw.guard.open == 0)  # type: ignore[union-attr]
    assert _fds() <= baseline + 5


async def test_connections_beyond_the_cap_get_an_openai_503(fabric: Fabric, unique: str) -> None:
    model = f"cap-{unique}"
    gw = await fabric.gateway(max_connections=4)
    worker = await fabric.worker(model, max_concurrency=8, ttft_ms=2000)
    body = json.dumps({"model": model, "messages": MSG}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    busy = await _open(gw.port, 4, head=request)  # four requests in flight
    try:
        await until(lambda: worker.inflight == 4)
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as http:
            r = await http.get("/ready")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "service_unavailable"
    finally:
        for s in busy:
            s.close()


async def test_idle_keepalive_connections_make_room_at_the_cap(fabric: Fabric) -> None:
    """Connections idle between requests count against the cap but are closed to let
    a new client in; the one evicted reconnects on its next request."""
    gw = await fabric.gateway(max_connections=4)
    assert gw.guard is not None
    clients = [httpx.AsyncClient(base_url=gw.base_url, timeout=5) for _ in range(4)]
    try:
        for c in clients:  # four keep-alive connections, each idle after one answer
            assert (await c.get("/health")).status_code == 200
        assert gw.guard.open == 4
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as fresh:
            assert (await fresh.get("/health")).status_code == 200
        assert gw.guard.evicted == 1 and gw.guard.refused == 0
    finally:
        for c in clients:
            await c.aclose()


def test_idle_timeout_outlasts_the_clients_keepalive() -> None:
    """A server closing an idle connection as the client reuses it fails that request
    ("Connection error."); clients must give up idle connections first."""
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    from nebula.settings import GatewaySettings

    expiry = DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    assert expiry is not None and GatewaySettings().idle_timeout > expiry + 1


async def test_stalled_body_gets_408(fabric: Fabric) -> None:
    gw = await fabric.gateway(body_timeout=0.5)
    loop = asyncio.get_running_loop()
    (s,) = await _open(
        gw.port,
        1,
        head=b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    )
    try:
        data = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b'"code":"request_timeout"' in data


async def test_client_leaving_mid_body_logs_no_traceback(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await fabric.gateway()
    caplog.set_level(logging.INFO)
    for _ in range(20):
        (s,) = await _open(
            gw.port,
            1,
            head=b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
        )
        s.close()
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        assert (await http.get("/health")).status_code == 200
    with contextlib.suppress(AssertionError):
        await until(lambda: any("left during" in r.message for r in caplog.records), 3)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
