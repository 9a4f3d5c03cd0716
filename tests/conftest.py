"""Shared fixtures: ONE real nats-server (port 0, temporary store) per test session.

Tests isolate themselves by unique model names; a test that needs clean
JetStream state starts its own server with :func:`fresh_nats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from openai import AsyncOpenAI

from gateway.server import GatewayServer
from nebula import natsio
from nebula.embedded import EmbeddedCluster, EmbeddedNats
from nebula.settings import (
    EmbeddedNatsSettings,
    GatewaySettings,
    NatsSettings,
    SimSettings,
    WorkerSettings,
)
from workers.engines.sim import SimEngine
from workers.runner import WorkerProcess
from workers.worker import Worker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", help="chaos suite: repeat every fault many times"
    )


@pytest.fixture(scope="session")
def repeats(request: pytest.FixtureRequest) -> int:
    """How often a chaos test injects its fault: once in CI, 10 times with --long."""
    return 10 if request.config.getoption("--long") else 1


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    store = tmp_path_factory.mktemp("nats")
    server = EmbeddedNats(
        EmbeddedNatsSettings(port=0, store_dir=store), log_file=store / "nats.log"
    )
    async with server:
        yield server


@pytest.fixture(scope="session")
def nats_settings(nats_server: EmbeddedNats) -> NatsSettings:
    return NatsSettings(url=nats_server.url)


@pytest.fixture
async def nc(nats_settings: NatsSettings) -> AsyncIterator[Client]:
    conn = await natsio.connect(nats_settings, name="test")
    yield conn
    await conn.close()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for model names, so tests sharing one server never collide."""
    return uuid.uuid4().hex[:8]


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait on an observable condition (sync or async), never on a bare sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = cond()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def nats_cluster_at(tmp: Path, size: int = 3, **kw: Any) -> EmbeddedCluster:
    """A started JetStream cluster of ``size`` servers on free ports (a fresh one per
    caller: chaos tests kill its members)."""
    ports = [free_port() for _ in range(2 * size)]
    cluster = EmbeddedCluster(tmp, ports[:size], ports[size:], **kw)
    try:
        await cluster.start()
    except BaseException:
        await cluster.close()
        raise
    return cluster


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[EmbeddedCluster]:
    cluster = await nats_cluster_at(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        await cluster.close()


async def fresh_nats(tmp: Path, port: int = 0) -> EmbeddedNats:
    server = EmbeddedNats(EmbeddedNatsSettings(port=port, store_dir=tmp), log_file=tmp / "nats.log")
    await server.start()
    return server


class Fabric:
    """Builds gateways and workers for one test and stops them all afterwards."""

    def __init__(self, stack: contextlib.AsyncExitStack, nats: NatsSettings) -> None:
        self.stack = stack
        self.nats = nats

    async def gateway(self, **settings: Any) -> GatewayServer:
        gs = GatewaySettings(**{"port": 0, "dispatch_timeout": 5.0, **settings})
        return await self.stack.enter_async_context(GatewayServer(gs, self.nats))

    async def worker(
        self,
        model: str,
        *,
        max_concurrency: int = 8,
        worker: dict[str, Any] | None = None,
        **sim: Any,
    ) -> Worker:
        engine = SimEngine(SimSettings(max_concurrency=max_concurrency, **sim))
        ws = WorkerSettings(model=model, max_concurrency=max_concurrency, **(worker or {}))
        wp = await self.stack.enter_async_context(WorkerProcess(ws, self.nats, engine))
        assert wp.worker is not None
        return wp.worker

    async def client(self, gw: GatewayServer, **kw: Any) -> AsyncOpenAI:
        c = AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="none", max_retries=0, **kw)
        return await self.stack.enter_async_context(c)


@pytest.fixture
async def fabric(nats_settings: NatsSettings) -> AsyncIterator[Fabric]:
    async with contextlib.AsyncExitStack() as stack:
        yield Fabric(stack, nats_settings)
