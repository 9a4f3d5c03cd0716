"""Shared fixtures: ONE real nats-server (port 0, temporary store) per test session.

Tests isolate themselves by unique model names; a test that needs clean
JetStream state starts its own server with :func:`fresh_nats`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from nebula import natsio
from nebula.embedded import EmbeddedNats
from nebula.settings import EmbeddedNatsSettings, NatsSettings


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


async def fresh_nats(tmp: Path, port: int = 0) -> EmbeddedNats:
    server = EmbeddedNats(EmbeddedNatsSettings(port=port, store_dir=tmp), log_file=tmp / "nats.log")
    await server.start()
    return server
