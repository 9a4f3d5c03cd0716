"""Request migration: a stream whose worker dies mid-answer continues on another
replica (opt-in per model), so the client sees one uninterrupted answer."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import msgspec
import openai
from nats.aio.client import Client

from gateway.migration import Migration
from nebula import natsio, subjects
from nebula.protocol import Endpoint, ModelSpec
from nebula.settings import NatsSettings
from tests.conftest import Fabric, until

MSG = [{"role": "user", "content": "tell me a long story"}]


async def _load(nc: Client, settings: NatsSettings, model: str, migrate: int) -> None:
    spec = ModelSpec(name=model, engine="sim", migrate=migrate, created_at=time.time())
    kv = await natsio.models_bucket(nc.jetstream(), settings)
    await kv.put(subjects.model_key(model), msgspec.json.encode(spec))


async def _worker(url: str, model: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "worker", "--model", model, "--nats-url", url,
        "--engine", "sim", "--itl-ms", "40", env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip


async def test_stream_continues_on_another_replica(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    model = f"migrate-{unique}"
    await _load(nc, nats_settings, model, migrate=1)
    gw = await fabric.gateway(keepalive_timeout=1.5)
    assert gw.gateway is not None
    client = await fabric.client(gw)
    first = await _worker(nats_settings.url, model)
    try:
        await until(lambda: len(gw.gateway.models.live_workers(model)) == 1, timeout=30)
        stream = await client.chat.completions.create(
            model=model,
            messages=MSG,
            stream=True,
            max_tokens=60,
            stream_options={"include_usage": True},
        )
        chunks = []
        async for c in stream:
            chunks.append(c)
            if len(chunks) == 10:  # tokens reached us: now the worker dies
                await fabric.worker(model, ttft_ms=5, itl_ms=2)
                first.send_signal(signal.SIGKILL)
    finally:
        if first.returncode is None:
            first.kill()
        await first.wait()
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert len(roles) == 1, "one answer opens once"
    assert finish[-1] == "length" and finish.count("length") == 1
    assert len({c.id for c in chunks}) == 1, "every chunk carries the first attempt's id"
    assert len(content) == 60, "the limit counts what the first replica sent"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 60
    assert gw.gateway.dispatcher.migrations == 1


async def test_without_migration_the_stream_ends_with_an_error(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    model = f"nomigrate-{unique}"
    await _load(nc, nats_settings, model, migrate=0)
    gw = await fabric.gateway(keepalive_timeout=1.5)
    assert gw.gateway is not None
    client = await fabric.client(gw)
    first = await _worker(nats_settings.url, model)
    try:
        await until(lambda: len(gw.gateway.models.live_workers(model)) == 1, timeout=30)
        stream = await client.chat.completions.create(
            model=model, messages=MSG, stream=True, max_tokens=60
        )
        got = 0
        try:
            async for _ in stream:
                got += 1
                if got == 10:
                    await fabric.worker(model)
                    first.send_signal(signal.SIGKILL)
            raise AssertionError("the stream should end with an error event")
        except openai.APIError as e:
            assert "went silent" in str(e)
    finally:
        if first.returncode is None:
            first.kill()
        await first.wait()
    assert gw.gateway.dispatcher.migrations == 0


def test_what_may_migrate() -> None:
    body = msgspec.json.encode({"model": "m", "messages": MSG, "stream": True, "max_tokens": 9})
    assert Migration.for_request(Endpoint.CHAT, body, 1) is not None
    assert Migration.for_request(Endpoint.CHAT, body, 0) is None  # off for the model
    for extra in (
        {"response_format": {"type": "json_object"}},
        {"guided_json": {"type": "object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"logprobs": True},
        {"n": 2},
        {"stream": False},
    ):
        other = msgspec.json.encode({**msgspec.json.decode(body), **extra})
        assert Migration.for_request(Endpoint.CHAT, other, 1) is None, extra
    tokens = msgspec.json.encode({"model": "m", "prompt": [1, 2], "stream": True})
    assert Migration.for_request(Endpoint.COMPLETION, tokens, 1) is None
    assert Migration.for_request(Endpoint.EMBEDDING, body, 1) is None


def test_continuation_carries_the_text_and_the_rest_of_the_limit() -> None:
    body = msgspec.json.encode({"model": "m", "prompt": "Once", "stream": True, "max_tokens": 5})
    m = Migration.for_request(Endpoint.COMPLETION, body, 1)
    assert m is not None
    frame = b"".join(
        b'data: {"id":"cmpl-1","created":7,"choices":[{"index":0,"text":"%s"}]}\n\n' % w
        for w in (b" upon", b" a")
    )
    assert m.relay(frame) == frame  # the first attempt's frames pass untouched
    cont = msgspec.json.decode(m.continuation() or b"")
    assert cont["prompt"] == "Once upon a" and cont["max_tokens"] == 3
    assert m.continuation() is None  # one continuation allowed
    later = m.relay(b'data: {"id":"cmpl-2","created":9,"choices":[{"index":0,"text":" time"}]}\n\n')
    assert msgspec.json.decode(later[6:].strip())["id"] == "cmpl-1"
