"""Cancellation, dead workers, load sharing and NATS restarts, with real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from nebula.settings import NatsSettings
from tests.conftest import Fabric, fresh_nats

MSG = [{"role": "user", "content": "hello there"}]


async def _spawn_worker(nats_url: str, model: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "worker", "--model", model, "--nats-url", nats_url,
        *args, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip


async def _wait_listed(client: openai.AsyncOpenAI, model: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if model in {m.id async for m in client.models.list()}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{model} never became ready")


@pytest.fixture
async def killable(nats_settings: NatsSettings) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for p in procs:
        if p.returncode is None:
            p.kill()
            await p.wait()


async def test_stream_disconnect_cancels_job_and_frees_slot(fabric: Fabric, unique: str) -> None:
    model = f"cancel-{unique}"
    gw = await fabric.gateway()
    worker = await fabric.worker(model, max_concurrency=1, itl_ms=50, max_tokens=200)
    client = await fabric.client(gw)
    stream = await client.chat.completions.create(model=model, messages=MSG, stream=True)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()
    for _ in range(100):
        if worker.inflight == 0:
            break
        await asyncio.sleep(0.02)
    assert worker.jobs_cancelled == 1 and worker.inflight == 0
    # The freed slot serves the next request straight away.
    r = await client.chat.completions.create(model=model, messages=MSG, max_tokens=2)
    assert r.choices[0].message.content


async def test_unary_disconnect_cancels_job(fabric: Fabric, unique: str) -> None:
    model = f"ucancel-{unique}"
    gw = await fabric.gateway()
    worker = await fabric.worker(model, max_concurrency=1, ttft_ms=3000)
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json={"model": model, "messages": MSG})
    for _ in range(100):
        if worker.inflight == 0:
            break
        await asyncio.sleep(0.02)
    assert worker.jobs_cancelled == 1 and worker.inflight == 0


async def test_worker_killed_mid_stream_ends_with_error(
    fabric: Fabric, nats_settings: NatsSettings, unique: str, killable: list
) -> None:
    model = f"midkill-{unique}"
    gw = await fabric.gateway(keepalive_timeout=1.5)
    client = await fabric.client(gw)
    proc = await _spawn_worker(nats_settings.url, model, "--itl-ms", "100", "--max-tokens", "500")
    killable.append(proc)
    await _wait_listed(client, model)
    stream = await client.chat.completions.create(model=model, messages=MSG, stream=True)
    got = 0
    t0 = 0.0
    with pytest.raises(openai.APIError) as e:
        async for _ in stream:
            got += 1
            if got == 5:
                proc.send_signal(signal.SIGKILL)
                t0 = time.monotonic()
    assert "went silent" in str(e.value)
    waited = time.monotonic() - t0
    assert waited < 5.0, f"client waited {waited:.1f}s for the error"


async def test_worker_killed_before_first_token_is_retried(
    fabric: Fabric, nats_settings: NatsSettings, unique: str, killable: list
) -> None:
    model = f"retry-{unique}"
    gw = await fabric.gateway(keepalive_timeout=1.5, dispatch_timeout=10)
    client = await fabric.client(gw)
    proc = await _spawn_worker(nats_settings.url, model, "--ttft-ms", "5000")
    killable.append(proc)
    await _wait_listed(client, model)
    pending = asyncio.create_task(
        client.chat.completions.create(model=model, messages=MSG, stream=True)
    )
    await asyncio.sleep(1.0)  # the subprocess has started the job by now
    survivor = await fabric.worker(model)
    proc.send_signal(signal.SIGKILL)
    stream = await asyncio.wait_for(pending, 10)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert len(text.split()) == 16
    assert survivor.jobs_started == 1


async def test_two_workers_share_load(fabric: Fabric, unique: str) -> None:
    model = f"share-{unique}"
    gw = await fabric.gateway()
    a = await fabric.worker(model, max_concurrency=2, ttft_ms=150)
    b = await fabric.worker(model, max_concurrency=2, ttft_ms=150)
    client = await fabric.client(gw)
    results = await asyncio.gather(
        *[client.chat.completions.create(model=model, messages=MSG) for _ in range(12)]
    )
    assert len(results) == 12
    assert a.jobs_started + b.jobs_started == 12
    assert a.jobs_started >= 3 and b.jobs_started >= 3
    # Flow control: a worker never holds more jobs than it has slots.
    assert a.peak_inflight <= 2 and b.peak_inflight <= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_nats_restart_everything_reconnects(tmp_path: Path, unique: str) -> None:
    """Kill -9 the NATS server, start it again on the same port: the fabric serves again."""
    import contextlib

    port = _free_port()
    server = await fresh_nats(tmp_path, port=port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            fab = Fabric(stack, NatsSettings(url=server.url))
            model = f"restart-{unique}"
            gw = await fab.gateway()
            await fab.worker(model)
            client = await fab.client(gw)
            assert (await client.chat.completions.create(model=model, messages=MSG)).choices
            await server.kill()
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=gw.base_url) as http:
                assert (await http.get("/ready")).status_code == 503
                down = await http.post(
                    "/v1/chat/completions", json={"model": model, "messages": MSG}
                )
                assert down.status_code == 503 and down.json()["error"]
            server = await fresh_nats(tmp_path, port=port)
            t0 = time.monotonic()
            last: Exception | None = None
            while time.monotonic() - t0 < 20:
                try:
                    r = await client.chat.completions.create(model=model, messages=MSG)
                    assert r.choices[0].message.content
                    break
                except openai.APIError as e:
                    last = e
                    await asyncio.sleep(0.25)
            else:
                raise AssertionError(f"no recovery after NATS restart: {last!r}")
            print(f"recovered {time.monotonic() - t0:.2f}s after NATS came back")
    finally:
        await server.close()


async def test_worker_drain_loses_no_job(fabric: Fabric, unique: str) -> None:
    """A worker stopping (unload, scale-down) finishes its jobs and hands queued ones on."""
    model = f"drain-{unique}"
    gw = await fabric.gateway()
    leaving = await fabric.worker(model, max_concurrency=4, ttft_ms=30, itl_ms=5)
    staying = await fabric.worker(model, max_concurrency=4, ttft_ms=30, itl_ms=5)
    client = await fabric.client(gw)
    stop_at = time.monotonic() + 3.0
    done: list[int] = []

    async def user() -> None:
        while time.monotonic() < stop_at:
            stream = await client.chat.completions.create(model=model, messages=MSG, stream=True)
            chunks = [c async for c in stream]
            assert chunks[-1].choices[0].finish_reason == "stop"
            done.append(1)

    users = asyncio.gather(*[user() for _ in range(8)])
    await asyncio.sleep(1.0)
    await leaving.close()
    await users  # raises if any request failed
    assert leaving.jobs_started > 0 and staying.jobs_started > 0
    assert len(done) == leaving.jobs_started + staying.jobs_started


async def test_stream_client_leaving_the_queue_withdraws_its_job(
    fabric: Fabric, unique: str
) -> None:
    model = f"qleave-{unique}"
    gw = await fabric.gateway(dispatch_timeout=20)
    worker = await fabric.worker(model, max_concurrency=1, ttft_ms=1500)
    client = await fabric.client(gw)
    busy = asyncio.create_task(client.chat.completions.create(model=model, messages=MSG))
    while worker.inflight == 0:
        await asyncio.sleep(0.01)
    body = {"model": model, "messages": MSG, "stream": True}
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body)
    await busy
    await asyncio.sleep(0.5)  # the slot is free: a job left in the queue would start now
    assert worker.jobs_started == 1
    assert gw.gateway is not None and gw.gateway.dispatcher.calls == {}
