"""A real 3-server NATS cluster: replicated streams and buckets, replicas raised in
place, and JetStream calls that ride through the loss of the connected server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path

import openai
import pytest
from nats.js.api import StorageType
from openai import AsyncOpenAI

from nebula import natsio, subjects
from nebula.embedded import EmbeddedCluster
from nebula.settings import NatsSettings
from tests.conftest import Fabric, nats_cluster_at, until

MSG = [{"role": "user", "content": "hello"}]


async def test_cluster_streams_and_buckets_get_three_replicas(
    nats_cluster: EmbeddedCluster, unique: str
) -> None:
    settings = NatsSettings(url=nats_cluster.url)
    nc = await natsio.connect(settings, name="test")
    try:
        js = nc.jetstream()
        kv = await natsio.models_bucket(js, settings)
        assert (await kv.status()).stream_info.config.num_replicas == 3
        await natsio.ensure_batch_streams(js, settings)
        info = await js.stream_info(subjects.JOB_STREAM)
        assert info.config.num_replicas == 3 and info.cluster is not None
        # auto request storage on a cluster: file, R3, so a lost server loses no job
        model = f"r3-{unique}"
        await natsio.ensure_request_stream(js, settings, model)
        info = await js.stream_info(subjects.req_stream(model))
        assert info.config.storage == StorageType.FILE and info.config.num_replicas == 3
        # the setting picks memory R1 instead
        mem = NatsSettings(url=settings.url, request_storage="memory")
        await natsio.ensure_request_stream(js, mem, f"m-{model}")
        info = await js.stream_info(subjects.req_stream(f"m-{model}"))
        assert info.config.storage == StorageType.MEMORY and info.config.num_replicas == 1
    finally:
        await nc.close()


async def test_single_server_defaults_to_one_replica(
    nc: object, nats_settings: NatsSettings, unique: str
) -> None:
    """JetStream on one server refuses 3 replicas (10074): buckets and streams get 1,
    auto request storage memory R1; raising them in place is a quiet no-op."""
    from nats.aio.client import Client

    assert isinstance(nc, Client)
    js = nc.jetstream()
    kv = await natsio.ensure_bucket(js, nats_settings, f"b-{unique}")
    assert (await kv.status()).stream_info.config.num_replicas == 1
    await natsio.ensure_bucket(js, nats_settings, f"b-{unique}")  # tries to raise: stays
    assert (await kv.status()).stream_info.config.num_replicas == 1
    model = f"one-{unique}"
    await natsio.ensure_request_stream(js, nats_settings, model)
    info = await js.stream_info(subjects.req_stream(model))
    assert (info.config.storage, info.config.num_replicas) == (StorageType.MEMORY, 1)
    # file storage asked for explicitly: file, still one replica
    filed = NatsSettings(url=nats_settings.url, request_storage="file")
    await natsio.ensure_request_stream(js, filed, f"f-{model}")
    info = await js.stream_info(subjects.req_stream(f"f-{model}"))
    assert (info.config.storage, info.config.num_replicas) == (StorageType.FILE, 1)
    # a replica count configured on purpose is not silently lowered: JetStream's error
    with pytest.raises(Exception, match="replicas"):
        await natsio.ensure_bucket(
            js, NatsSettings(url=nats_settings.url, replicas=3), f"c-{unique}"
        )


async def test_replicas_raised_in_place_keep_data(
    nats_cluster: EmbeddedCluster, unique: str
) -> None:
    """An R1 deployment (the old default) moved to R3 by the next process that starts:
    every message and key is still there, now on three servers."""
    one = NatsSettings(url=nats_cluster.url, replicas=1)
    nc = await natsio.connect(one, name="test")
    try:
        js = nc.jetstream()
        await natsio.ensure_batch_streams(js, one)
        kv = await natsio.models_bucket(js, one)
        await kv.put(f"k-{unique}", b"v")
        subject = subjects.job_subject(f"raise-{unique}")
        for i in range(50):
            await js.publish(subject, f"{i}".encode())
        before = (await js.stream_info(subjects.JOB_STREAM)).state.messages
        assert (await js.stream_info(subjects.JOB_STREAM)).config.num_replicas == 1

        three = NatsSettings(url=nats_cluster.url)  # auto: 3 on this cluster
        await natsio.ensure_batch_streams(js, three)
        kv = await natsio.models_bucket(js, three)
        info = await js.stream_info(subjects.JOB_STREAM)
        assert info.config.num_replicas == 3 and info.state.messages == before

        async def caught_up() -> bool:
            i = await js.stream_info(subjects.JOB_STREAM)
            return (
                i.cluster is not None
                and len(i.cluster.replicas or []) == 2
                and all(r.current for r in i.cluster.replicas or [])
            )

        await until(caught_up, timeout=30)
        assert (await kv.get(f"k-{unique}")).value == b"v"
        assert (await kv.status()).stream_info.config.num_replicas == 3
    finally:
        await nc.close()


async def test_kv_and_stream_survive_losing_the_connected_server(
    tmp_path: Path, unique: str
) -> None:
    """Kill the server a client is connected to: the retry helper carries writes
    through the failover and the election; a file R3 work queue keeps every message."""
    cluster = await nats_cluster_at(tmp_path / "c")
    try:
        settings = NatsSettings(url=cluster.url, retry_timeout=30.0)
        nc2 = await natsio.connect(settings, name="test")
        try:
            js = nc2.jetstream()
            kv = await natsio.models_bucket(js, settings)
            model = f"survive-{unique}"
            await natsio.ensure_request_stream(js, settings, model)
            for i in range(20):
                await js.publish(subjects.req_subject(model), f"{i}".encode())
            # kill whichever server the client is connected to
            url = nc2.connected_url
            assert url is not None
            victim = next(i for i, u in enumerate(cluster.urls) if u.endswith(f":{url.port}"))
            t0 = time.monotonic()
            await cluster.kill(victim)
            await natsio.retrying(
                lambda: kv.put(f"after-{unique}", b"1"),
                timeout=30,
                what="kv put",
                nc=nc2,
            )
            elapsed = time.monotonic() - t0
            print(f"KV writable {elapsed:.2f}s after the connected server was killed")
            info = await natsio.retrying(
                lambda: js.stream_info(subjects.req_stream(model)), timeout=30, what="info"
            )
            assert info.state.messages == 20
            await cluster.members[victim].start()
            await cluster.wait_ready()
        finally:
            await nc2.close()
    finally:
        await cluster.close()


class Outcomes:
    """What each request of a load loop ended with: ok, or a clear error (status, text)."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors: list[tuple[int | None, str]] = []
        self.slowest = 0.0

    def unclear(self) -> list[tuple[int | None, str]]:
        """Errors a client could not act on: a 500, a timeout, an empty message."""
        return [e for e in self.errors if e[0] in (None, 500) or not e[1]]


async def load_loop(
    client: AsyncOpenAI, model: str, out: Outcomes, stop: asyncio.Event, deadline: float
) -> None:
    """Streams and unary requests back to back, each with its own deadline."""
    n = 0
    while not stop.is_set():
        n += 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(deadline):
                if n % 2:
                    stream = await client.chat.completions.create(
                        model=model, messages=MSG, stream=True
                    )
                    text = "".join([c.choices[0].delta.content or "" async for c in stream])
                else:
                    r = await client.chat.completions.create(model=model, messages=MSG)
                    text = r.choices[0].message.content or ""
            assert text
            out.ok += 1
        except openai.APIStatusError as e:
            out.errors.append((e.status_code, e.message))
        except openai.APIError as e:  # an SSE error event mid-stream: carries its message
            out.errors.append((getattr(e, "status_code", 0) or 0, e.message))
        except TimeoutError:
            out.errors.append((None, f"no answer within {deadline}s"))
        out.slowest = max(out.slowest, time.monotonic() - t0)


async def test_gateway_rides_through_losing_its_nats_server(tmp_path: Path, unique: str) -> None:
    """Kill the server the gateway is connected to while requests flow: every request
    ends with an answer or a clear error within its deadline, none with a 500."""
    cluster = await nats_cluster_at(tmp_path / "c")
    try:
        async with contextlib.AsyncExitStack() as stack:
            fab = Fabric(stack, NatsSettings(url=cluster.url))
            model = f"ride-{unique}"
            gw = await fab.gateway(dispatch_timeout=20.0, keepalive_timeout=3.0)
            for _ in range(2):
                await fab.worker(model, ttft_ms=5, itl_ms=10, max_tokens=12)
            client = await fab.client(gw, timeout=30.0)
            out = Outcomes()
            stop = asyncio.Event()
            loops = [
                asyncio.create_task(load_loop(client, model, out, stop, 30.0)) for _ in range(4)
            ]
            await until(lambda: out.ok >= 20, timeout=60)
            assert gw.gateway is not None
            url = gw.gateway.nc.connected_url
            assert url is not None
            victim = next(i for i, u in enumerate(cluster.urls) if u.endswith(f":{url.port}"))
            killed_at, ok_at_kill = time.monotonic(), out.ok
            await cluster.kill(victim)
            await until(lambda: out.ok >= ok_at_kill + 40, timeout=60)
            print(f"40 answers {time.monotonic() - killed_at:.2f}s after the kill")
            stop.set()
            await asyncio.gather(*loops)
            print(f"ok={out.ok} errors={out.errors} slowest={out.slowest:.2f}s")
            assert not out.unclear(), out.unclear()
            assert gw.gateway.nc.connected_url is not None
            assert gw.gateway.nc.connected_url.port != url.port
    finally:
        await cluster.close()


def test_only_election_errors_are_retried() -> None:
    """A leader election's answers are retried; a real answer (queue full, too large,
    bad request) is not, so a full queue is still a 429 at once."""
    import nats.errors
    from nats.js.errors import APIError, BadRequestError, NoStreamResponseError

    assert natsio.transient(nats.errors.TimeoutError())
    assert natsio.transient(nats.errors.NoRespondersError())
    assert natsio.transient(NoStreamResponseError())
    assert natsio.transient(
        APIError(code=503, description="JetStream system temporarily unavailable")
    )
    assert natsio.transient(APIError(code=500, description="JetStream not ready"))
    assert not natsio.transient(
        APIError(code=503, err_code=10077, description="maximum messages exceeded")
    )
    assert not natsio.transient(
        APIError(code=400, err_code=10054, description="message size exceeds")
    )
    assert not natsio.transient(BadRequestError(code=400, description="bad request"))
    assert not natsio.transient(ValueError("no"))


async def test_retrying_backs_off_then_gives_up() -> None:
    import nats.errors

    calls: list[float] = []

    async def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise nats.errors.TimeoutError
        return "ok"

    assert await natsio.retrying(flaky, timeout=10, what="flaky") == "ok"
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[-1] > gaps[0]  # backing off

    async def never() -> None:
        raise nats.errors.TimeoutError

    t0 = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await natsio.retrying(never, timeout=0.5, what="never")
    assert time.monotonic() - t0 < 2.0

    async def final() -> None:
        raise ValueError("a real answer")

    with pytest.raises(ValueError):
        await natsio.retrying(final, timeout=10, what="final")


async def test_retry_loops_end_on_a_cancel_that_nats_swallowed() -> None:
    """nats-py turns a cancel inside a request into its own TimeoutError in places: a
    retry loop must still end when its task is cancelled, not retry on (shutdown
    would wait for it)."""
    import nats.errors

    entered = asyncio.Event()

    async def swallowing() -> None:
        try:
            entered.set()
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise nats.errors.TimeoutError from None

    task = asyncio.ensure_future(natsio.retrying(swallowing, timeout=60, what="swallowing"))
    await entered.wait()
    task.cancel()
    async with asyncio.timeout(2):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


async def test_nebula_nats_cli_runs_cluster_members(tmp_path: Path) -> None:
    """`nebula nats --cluster NAME --routes ...` three times: one JetStream cluster."""
    import os
    import signal
    import sys

    from tests.conftest import free_port

    ports = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    route_urls = ",".join(f"nats-route://127.0.0.1:{p}" for p in routes)
    members = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nebula.cli",
            "nats",
            "--port",
            str(ports[i]),
            "--cluster",
            "nebula",
            "--server-name",
            f"m{i}",
            "--cluster-port",
            str(routes[i]),
            "--routes",
            route_urls,
            "--data-dir",
            str(tmp_path / f"m{i}"),
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        for i in range(3)
    ]
    try:
        settings = NatsSettings(url=",".join(f"nats://127.0.0.1:{p}" for p in ports))

        async def formed() -> bool:
            one = NatsSettings(url=f"nats://127.0.0.1:{ports[0]}")
            try:
                nc = await natsio.connect(one, name="test", connect_timeout=1)
            except Exception:
                return False
            try:
                # all three servers routed: the one we reached tells us of the other two
                if len(nc.discovered_servers) < 2:
                    return False
                await nc.jetstream(timeout=2).account_info()
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        await until(formed, timeout=60)
        nc = await natsio.connect(settings, name="test")
        try:
            kv = await natsio.models_bucket(nc.jetstream(), settings)
            assert (await kv.status()).stream_info.config.num_replicas == 3
        finally:
            await nc.close()
    finally:
        for m in members:
            m.send_signal(signal.SIGTERM)
        for m in members:
            await m.wait()
