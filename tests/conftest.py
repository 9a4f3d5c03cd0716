"""Shared fixtures: ONE real nats-server (port 0, temporary store) per test session.

Tests isolate themselves by unique model names; a test that needs clean
JetStream state starts its own server with :func:`fresh_nats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import inspect
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from openai import AsyncOpenAI

from gateway.server import GatewayServer
from nebula import natsio, procs
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

# Deadlines. pytest-timeout's signal method raises inside whatever frame runs when SIGALRM
# comes; in an event loop that can be asyncio's own machinery, which leaves the loop broken
# and the fixtures' teardown hanging (one CI run hung so until CI's limit). An async test
# instead gets its deadline inside its loop: every task's stack is printed, the test is
# cancelled and fails, and fixtures tear down as usual. A thread (faulthandler) backs it up
# over setup, call and teardown: BACKSTOP_GRACE past the deadline it prints every thread's
# stack and ends the run, so a hang fails CI in minutes. Sync tests keep pytest-timeout.
BACKSTOP_GRACE = 300.0
_DEADLINE = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if not inspect.iscoroutinefunction(getattr(item, "obj", None)):
        return None  # pytest-timeout's own timer
    item.stash[_DEADLINE] = float(settings.timeout)
    faulthandler.dump_traceback_later(settings.timeout + BACKSTOP_GRACE, exit=True)
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    if _DEADLINE not in item.stash:
        return None
    faulthandler.cancel_dump_traceback_later()
    return True


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    deadline = item.stash.get(_DEADLINE, None)
    if deadline is None:
        return (yield)
    assert isinstance(item, pytest.Function)
    original = item.obj

    @functools.wraps(original)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            procs.print_tasks(f"{item.nodeid}: past its {deadline:g}s deadline")
            task.cancel()

        timer = asyncio.get_running_loop().call_later(deadline, expire)
        try:
            return await original(*args, **kwargs)
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel()
            pytest.fail(f"past its {deadline:g}s deadline (task stacks above, in stderr)")
        finally:
            timer.cancel()

    item.obj = bounded
    try:
        return (yield)
    finally:
        item.obj = original


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failure's report at once, not only in the summary: a run that is killed later
    (the backstop above, CI's limit) still shows why its tests failed."""
    if report.failed:
        text = report.longreprtext.splitlines()
        print(f"\n--- {report.nodeid} ({report.when}) failed:", file=sys.__stderr__)
        print("\n".join(text[-80:]), file=sys.__stderr__, flush=True)


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
        self.gateways: list[GatewayServer] = []

    async def gateway(self, **settings: Any) -> GatewayServer:
        gs = GatewaySettings(**{"port": 0, "dispatch_timeout": 5.0, **settings})
        gw = await self.stack.enter_async_context(GatewayServer(gs, self.nats))
        self.gateways.append(gw)
        return gw

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
        w = wp.worker
        assert w is not None
        # A gateway learns of a worker from its heartbeat's KV watch, a moment after the
        # worker started: a request sent before that is a correct 404, not what a test
        # that sends at once means to check.
        for reg in [gw.gateway.models for gw in self.gateways if gw.gateway is not None]:
            await until(
                lambda r=reg: any(i.worker_id == w.worker_id for i in r.live_workers(model))
            )
        return w

    async def client(self, gw: GatewayServer, **kw: Any) -> AsyncOpenAI:
        c = AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="none", max_retries=0, **kw)
        return await self.stack.enter_async_context(c)


@pytest.fixture
async def fabric(nats_settings: NatsSettings) -> AsyncIterator[Fabric]:
    async with contextlib.AsyncExitStack() as stack:
        yield Fabric(stack, nats_settings)
