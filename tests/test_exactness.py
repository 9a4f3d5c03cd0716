"""Exactly once, under faults and abuse: SIGSTOP, cancels in every state, slow readers,
NATS restarts, poison messages, broken engines and gateway shutdown.

Every test proves an outcome (frames counted per request, counters of real workers,
processes, sockets) and waits on observable conditions, not on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import msgspec
import openai
from nats.aio.client import Client
from nats.aio.msg import Msg

from nebula import natsio, subjects
from nebula.protocol import WorkerInfo
from nebula.settings import NatsSettings, OpenAIUpstreamSettings, SimSettings, WorkerSettings
from tests.conftest import Fabric, free_port, fresh_nats, until
from workers.engines.openai_bridge import OpenAIEngine
from workers.engines.sim import SimEngine
from workers.runner import WorkerProcess
from workers.worker import Worker

MSG = [{"role": "user", "content": "hello there"}]


class Spy:
    """Counts the frames of every request on a gateway's reply subjects."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str, str, str]] = []  # rid, attempt, kind, worker

    async def on(self, msg: Msg) -> None:
        h = msg.headers or {}
        rid = subjects.request_id_from_reply(msg.subject)
        self.frames.append(
            (
                rid,
                h.get(subjects.H_ATTEMPT, ""),
                h.get(subjects.H_KIND, ""),
                h.get("Nebula-Worker", ""),
            )
        )

    def count(self, kind: str) -> Counter[str]:
        return Counter(rid for rid, _, k, _ in self.frames if k == kind)


async def _spy(nc: Client, gateway_id: str) -> Spy:
    spy = Spy()
    await nc.subscribe(subjects.reply_wildcard(gateway_id), cb=spy.on)
    await nc.flush()
    return spy


async def _spawn_worker(nats_url: str, model: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "worker", "--model", model, "--nats-url", nats_url,
        *args, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip


async def test_sigstopped_worker_runs_each_request_to_its_end_once(
    fabric: Fabric, nats_settings: NatsSettings, nc: Client, unique: str
) -> None:
    """Issue 6.3: SIGSTOP a worker holding started jobs past the gateway's silence
    timeout, SIGCONT it: every request ends exactly once, and the frozen worker
    sends nothing more for the attempts the gateway gave up on."""
    model = f"stop-{unique}"
    gw = await fabric.gateway(keepalive_timeout=1.5, dispatch_timeout=30)
    assert gw.gateway is not None
    spy = await _spy(nc, gw.gateway.gateway_id)
    client = await fabric.client(gw, timeout=60)
    procs = [
        await _spawn_worker(nats_settings.url, model, "--ttft-ms", "2500", "--max-concurrency", "8")
        for _ in range(2)
    ]
    try:
        await until(lambda: len(gw.gateway.models.live_workers(model)) == 2, 20)  # type: ignore[union-attr]
        n = 20
        calls = [
            asyncio.create_task(
                client.chat.completions.create(model=model, messages=MSG, max_tokens=8)
            )
            for _ in range(n)
        ]
        await until(lambda: len(spy.count("start")) >= 16)
        starts = [(rid, w) for rid, _, k, w in spy.frames if k == "start"]
        frozen_id = starts[0][1]
        kv = await natsio.workers_bucket(nc.jetstream(), nats_settings)
        frozen_pid = int(frozen_id[1:].split("-")[0])  # worker ids are w<pid>-<random>
        frozen = next(p for p in procs if p.pid == frozen_pid)
        frozen.send_signal(signal.SIGSTOP)
        # The gateway gives up on the frozen worker's attempts and re-queues them.
        await until(lambda: any(a == "2" and k == "start" for _, a, k, _ in spy.frames), 15)
        frozen.send_signal(signal.SIGCONT)
        resumed = time.time()
        results = await asyncio.gather(*calls)
        assert all(r.choices[0].message.content for r in results)

        async def frozen_idle() -> bool:
            entry = await kv.get(subjects.worker_key(model, frozen_id))
            info = msgspec.json.decode(entry.value or b"{}", type=WorkerInfo)
            return info.inflight == 0 and time.time() - resumed > 1.2

        await until(frozen_idle, 15)
        ends, errors = spy.count("end"), spy.count("error")
        rids = {rid for rid, _, k, _ in spy.frames if k == "start"}
        assert len(rids) == n
        assert all(ends[rid] == 1 for rid in rids), ends
        assert not errors
        retried = {rid for rid, a, _, _ in spy.frames if a == "2"}
        assert retried, "the test must have exercised a retry"
        for rid in retried:  # the abandoned attempt produced no data and no end
            kinds = [k for r, a, k, _ in spy.frames if r == rid and a == "1"]
            assert "data" not in kinds and "end" not in kinds, kinds
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.kill()
            await p.wait()


async def test_job_taken_for_a_request_nobody_waits_for_is_cancelled(
    fabric: Fabric, nc: Client, unique: str
) -> None:
    """Issue 6.4, state 'taken': a worker starts a job whose client is gone (withdrawn
    too late): its first frame reaches the gateway, which cancels it where it runs."""
    model = f"orphan-{unique}"
    gw = await fabric.gateway()
    assert gw.gateway is not None
    worker = await fabric.worker(model, max_concurrency=2, ttft_ms=5000)
    headers = {
        subjects.H_REQUEST_ID: "gone-1",
        subjects.H_REPLY: subjects.reply_subject(gw.gateway.gateway_id, "gone-1"),
        subjects.H_ATTEMPT: "1",
    }
    body = json.dumps({"model": model, "messages": MSG}).encode()
    await nc.jetstream().publish(subjects.req_subject(model), body, headers=headers)
    await until(lambda: worker.jobs_started == 1)
    await until(lambda: worker.inflight == 0 and worker.jobs_cancelled == 1, 3)


async def test_cancel_while_started_before_first_token(
    fabric: Fabric, nc: Client, unique: str
) -> None:
    """Issue 6.4, state 'started': the client leaves after start, before any token."""
    model = f"early-{unique}"
    gw = await fabric.gateway()
    assert gw.gateway is not None
    spy = await _spy(nc, gw.gateway.gateway_id)
    worker = await fabric.worker(model, max_concurrency=1, ttft_ms=5000)
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=httpx.Timeout(60)) as http:
        body = {"model": model, "messages": MSG, "stream": True}
        task = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        await until(lambda: worker.inflight == 1 and bool(spy.count("start")))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await until(lambda: worker.inflight == 0 and worker.jobs_cancelled == 1, 3)
    await until(lambda: not gw.gateway.dispatcher.calls)  # type: ignore[union-attr]
    assert not spy.count("end")


async def test_clients_leaving_at_random_moments_leak_nothing(
    fabric: Fabric, nc: Client, unique: str
) -> None:
    """Issue 6.4: clients that leave at any moment (queued, taken, started, streaming)
    leave no call, no job and no slot behind, and no request ends twice."""
    model = f"leave-{unique}"
    gw = await fabric.gateway()
    assert gw.gateway is not None
    spy = await _spy(nc, gw.gateway.gateway_id)
    worker = await fabric.worker(model, max_concurrency=4, ttft_ms=30, itl_ms=10, max_tokens=40)
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:

        async def leave_after(delay: float, stream: bool) -> None:
            body = {"model": model, "messages": MSG, "stream": stream}

            async def go() -> None:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        pass

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(go(), delay)

        await asyncio.gather(*[leave_after(0.005 * (i % 60), stream=i % 3 != 0) for i in range(60)])
    await until(lambda: not gw.gateway.dispatcher.calls and worker.inflight == 0, 10)  # type: ignore[union-attr]
    assert all(v == 1 for v in spy.count("end").values())


def _tcp_wmem_max() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def test_slow_reader_holds_back_the_worker_and_is_cut_off(
    fabric: Fabric, unique: str
) -> None:
    """Issue 6.5: a client that does not read costs one window per stream, the worker
    stops taking output from its engine, and the stream ends after slow_client_timeout."""
    model = f"slow-{unique}"
    window = 32 * 1024
    gw = await fabric.gateway(stream_window=window, slow_client_timeout=3.0)
    assert gw.gateway is not None
    worker = await fabric.worker(
        model, max_concurrency=2, max_tokens=16, worker={"max_output_tokens": 10**6}
    )
    body = json.dumps(
        {"model": model, "messages": MSG, "stream": True, "max_tokens": 200_000}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    await loop.sock_sendall(sock, head + body)
    try:
        await until(lambda: worker.inflight == 1)
        job = next(iter(worker._inflight.values()))
        # The worker stops once a window is outstanding: sent bytes stop growing.
        last = -1
        while job.sent != last:
            last = job.sent
            await asyncio.sleep(0.3)
        # What was sent sits in the kernel's send buffer (at most tcp_wmem's maximum)
        # and one window in the gateway: nothing in proportion to the ~40 MB answer.
        wmem_max = _tcp_wmem_max()
        assert job.sent < wmem_max + 4 * window + 256 * 1024, job.sent
        # One window, overshot by at most one batch of tokens (16 SSE chunks).
        assert job.sent - job.consumed <= window + 16 * 400, (job.sent, job.consumed)
        # Reading a little lets it go on...
        got = await loop.sock_recv(sock, 65536)
        assert got.startswith(b"HTTP/1.1 200")
        # ...and then not reading again ends the stream after slow_client_timeout.
        await until(lambda: worker.inflight == 0, 15)
        await until(lambda: not gw.gateway.dispatcher.calls)  # type: ignore[union-attr]
        assert worker.jobs_cancelled == 1
        # The connection is dropped (aborted), not left waiting to flush to a non-reader.
        await until(lambda: gw.guard is not None and gw.guard.open == 0)
    finally:
        sock.close()


async def test_jobs_lost_with_nats_are_queued_again(tmp_path: Path, unique: str) -> None:
    """Issue 6.2: jobs waiting in the memory stream when NATS dies are re-queued by
    the gateway once it reconnects; their clients get answers, not a timeout."""
    port = free_port()
    server = await fresh_nats(tmp_path, port=port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            fab = Fabric(stack, NatsSettings(url=server.url))
            model = f"lost-{unique}"
            gw = await fab.gateway(dispatch_timeout=60, keepalive_timeout=3)
            worker = await fab.worker(model, max_concurrency=1, ttft_ms=1500)
            client = await fab.client(gw, timeout=60)
            calls = [
                asyncio.create_task(client.chat.completions.create(model=model, messages=MSG))
                for _ in range(4)
            ]
            await until(lambda: worker.inflight == 1)
            await server.kill()
            server = await fresh_nats(tmp_path, port=port)
            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*calls), 30)
            assert all(r.choices[0].message.content for r in results)
            # Far below the 60 s dispatch timeout the lost jobs would have waited out.
            assert time.monotonic() - t0 < 25
    finally:
        await server.close()


async def _collect(nc: Client, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def cb(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=cb)
    return got


async def test_poison_messages_never_block_a_model(fabric: Fabric, nc: Client, unique: str) -> None:
    """Issue 6.7 and 6.8: a job carrying a `Status` header is a job; bad headers get a
    400 error frame; a job with no reply goes to the dead-letter subject with a reason."""
    model = f"poison-{unique}"
    gw = await fabric.gateway()
    worker = await fabric.worker(model, max_concurrency=2)
    js = nc.jetstream()
    inbox = nc.new_inbox()
    got = await _collect(nc, inbox + ".*")
    body = json.dumps({"model": model, "messages": MSG}).encode()
    for i in range(8):
        await js.publish(
            subjects.req_subject(model),
            body,
            headers={
                "Status": "503",
                "Description": "No Responders",
                subjects.H_REPLY: f"{inbox}.s{i}",
                subjects.H_REQUEST_ID: f"s{i}",
            },
        )
    bad = {
        "ep": {subjects.H_ENDPOINT: "bogus"},
        "dl": {subjects.H_DEADLINE: "tomorrow"},
        "at": {subjects.H_ATTEMPT: "-x"},
    }
    for name, h in bad.items():
        await js.publish(
            subjects.req_subject(model),
            body,
            headers={subjects.H_REPLY: f"{inbox}.{name}", subjects.H_REQUEST_ID: name, **h},
        )
    await js.publish(subjects.req_subject(model), body, headers={subjects.H_REQUEST_ID: "x"})

    def kinds(suffix: str) -> list[str]:
        return [
            (m.headers or {}).get(subjects.H_KIND, "") for m in got if m.subject.endswith(suffix)
        ]

    await until(lambda: all("end" in kinds(f".s{i}") for i in range(8)))
    for name in bad:
        await until(lambda name=name: kinds(f".{name}") == ["error"])  # type: ignore[misc]
        err = next(m for m in got if m.subject.endswith(f".{name}"))
        assert (err.headers or {})[subjects.H_STATUS] == "400"
    await until(lambda: worker.jobs_dead_lettered == 1)
    dead = await js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq_subject(model))
    assert "Nebula-Reply" in (dead.headers or {})[subjects.H_DEAD_REASON]
    # The model still answers bursts, with nothing stuck in its queue.
    client = await fabric.client(gw)
    rs = await asyncio.gather(
        *[client.chat.completions.create(model=model, messages=MSG) for _ in range(10)]
    )
    assert len(rs) == 10


async def test_job_delivered_too_often_is_dead_lettered(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    """Issue 6.7: a job redelivered past max_deliver goes to the dead-letter subject with
    the reason, its requester gets an error, and it leaves the queue."""
    model = f"redeliver-{unique}"
    ws = {"max_deliver": 1, "ack_wait": 0.5}
    # The model's queue and consumer, as its workers make them.
    maker = Worker(WorkerSettings(model=model, **ws), SimEngine(SimSettings()), nc, nats_settings)
    await natsio.ensure_request_stream(nc.jetstream(), nats_settings, model)
    await maker._ensure_consumer()
    js = nc.jetstream()
    inbox = nc.new_inbox()
    got = await _collect(nc, inbox)
    body = json.dumps({"model": model, "messages": MSG}).encode()
    await js.publish(
        subjects.req_subject(model),
        body,
        headers={subjects.H_REPLY: inbox, subjects.H_REQUEST_ID: "r1"},
    )
    # A consumer that takes the job and never acks it (a worker dying before its ack).
    black_hole = nc.new_inbox()
    taken = await _collect(nc, black_hole)
    pull = subjects.pull_next_subject(subjects.req_stream(model), subjects.req_consumer(model))
    await nc.publish(pull, b'{"batch":1,"expires":2000000000}', reply=black_hole)
    await until(lambda: any(m.data == body for m in taken))
    worker = await fabric.worker(model, worker=ws)
    await until(lambda: worker.jobs_dead_lettered == 1, 10)
    await until(lambda: bool(got))
    assert (got[0].headers or {})[subjects.H_KIND] == "error"
    dead = await js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq_subject(model))
    assert "delivered 2 times" in (dead.headers or {})[subjects.H_DEAD_REASON]
    assert worker.jobs_started == 0


async def test_unhealthy_engine_stops_pulling_until_it_recovers(
    fabric: Fabric, nats_settings: NatsSettings, unique: str
) -> None:
    """Issue 6.10: a worker whose upstream died takes no jobs (healthy replicas serve
    them all), says so in its heartbeat, and resumes when the upstream is back."""
    model = f"health-{unique}"
    upstream_model = f"up-{unique}"
    upstream = await fabric.gateway()
    await fabric.worker(upstream_model)
    port = upstream.port
    engine = OpenAIEngine(
        OpenAIUpstreamSettings(url=f"{upstream.base_url}/v1", upstream_model=upstream_model),
        max_concurrency=4,
    )
    ws = WorkerSettings(model=model, max_concurrency=4, health_interval=0.2, health_timeout=1)
    bridged = await fabric.stack.enter_async_context(WorkerProcess(ws, nats_settings, engine))
    bridge = bridged.worker
    assert bridge is not None
    sim = await fabric.worker(model, max_concurrency=4)
    gw = await fabric.gateway()
    client = await fabric.client(gw)
    await upstream.close()
    await until(lambda: not bridge.healthy)
    assert "health" in bridge.info().reason and not bridge.info().ready
    before = bridge.jobs_started
    rs = await asyncio.gather(
        *[client.chat.completions.create(model=model, messages=MSG) for _ in range(12)]
    )
    assert len(rs) == 12 and bridge.jobs_started == before
    assert sim.jobs_started == 12
    again = await fabric.gateway(port=port)
    assert again.port == port
    await until(lambda: bridge.healthy)
    assert bridge.info().ready


async def test_shutdown_drains_then_ends_open_streams_with_an_error_event(
    fabric: Fabric, unique: str
) -> None:
    """Issue 6.11: on close (SIGTERM) short streams finish; long ones end after
    drain_timeout with an OpenAI error event and a clean end of the response."""
    model = f"sigterm-{unique}"
    gw = await fabric.gateway(drain_timeout=1.0)
    worker = await fabric.worker(model, max_concurrency=8, itl_ms=50, max_tokens=200)
    client = await fabric.client(gw)

    async def consume(max_tokens: int) -> str:
        stream = await client.chat.completions.create(
            model=model, messages=MSG, stream=True, max_tokens=max_tokens
        )
        try:
            async for _ in stream:
                pass
        except openai.APIError as e:
            return f"error: {e.message}"
        return "complete"

    async def unary() -> str:
        try:
            await client.chat.completions.create(model=model, messages=MSG, max_tokens=200)
        except openai.APIStatusError as e:
            return f"{e.status_code}: {e.message}"
        return "complete"

    tasks = [asyncio.create_task(consume(10))] + [
        asyncio.create_task(consume(200)) for _ in range(4)
    ]
    tasks.append(asyncio.create_task(unary()))
    await until(lambda: worker.inflight == 6)
    t0 = time.monotonic()
    await gw.close()
    outcomes = await asyncio.gather(*tasks)
    assert outcomes[0] == "complete"
    assert all("shutting down" in o for o in outcomes[1:5]), outcomes
    assert outcomes[5].startswith("503") and "shutting down" in outcomes[5]
    assert time.monotonic() - t0 < 5
    await until(lambda: worker.inflight == 0)


async def test_a_first_frame_within_the_hold_carries_the_start(
    fabric: Fabric, nc: Client, unique: str
) -> None:
    """Gateway jobs say ``Nebula-Start: lazy``: an engine that answers within the worker's
    start_hold_ms sends no separate start frame (one message less per request), a slow
    one still sends start after the hold, and every request keeps its frames in order
    with exactly one end. Direct publishers (no header) get start at once:
    tests/test_nats_direct.py."""
    fast, slow = f"lazy-fast-{unique}", f"lazy-slow-{unique}"
    gw = await fabric.gateway()
    assert gw.gateway is not None
    frames: dict[str, list[tuple[str, int]]] = {}

    async def on(msg: Msg) -> None:
        h = msg.headers or {}
        rid = subjects.request_id_from_reply(msg.subject)
        frames.setdefault(rid, []).append((h[subjects.H_KIND], int(h[subjects.H_SEQ])))

    await nc.subscribe(subjects.reply_wildcard(gw.gateway.gateway_id), cb=on)
    await nc.flush()
    await fabric.worker(fast, max_concurrency=8, max_tokens=16)
    await fabric.worker(slow, max_concurrency=2, ttft_ms=1500, max_tokens=4)
    client = await fabric.client(gw, timeout=30)

    async def ask(model: str, stream: bool, rid: str | None = None) -> str:
        extra = {"X-Request-Id": rid} if rid else None
        if stream:
            chunks = await client.chat.completions.create(
                model=model, messages=MSG, stream=True, extra_headers=extra
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        r = await client.chat.completions.create(model=model, messages=MSG, extra_headers=extra)
        return r.choices[0].message.content or ""

    texts = await asyncio.gather(*[ask(fast, i % 2 == 0) for i in range(40)])
    assert all(len(t.split()) == 16 for t in texts)
    slow_rid = f"slow-{unique}"
    assert len((await ask(slow, True, slow_rid)).split()) == 4
    # The spy reads on its own connection: wait until it has seen every request's end.
    await until(lambda: len(frames) == 41 and all(g[-1][0] == "end" for g in frames.values()))
    for rid, got in frames.items():
        kinds = [k for k, _ in got]
        assert [n for _, n in got] == list(range(1, len(got) + 1)), (rid, got)
        assert kinds.count("end") == 1 and "error" not in kinds, (rid, got)
    # The slow engine (1.5 s to its first token) sent start after the hold, before data.
    assert frames[slow_rid][0] == ("start", 1), frames[slow_rid]
    # Of the fast ones at most a few did (a loop stalled past the hold on a loaded
    # machine sends start on its own; that is still correct).
    starts = sum(1 for rid, got in frames.items() if got[0][0] == "start" and rid != slow_rid)
    assert starts <= 10, f"{starts} of 40 fast requests sent a separate start frame"


async def test_a_job_taken_by_a_worker_silent_before_its_first_frame_runs_elsewhere(
    fabric: Fabric, nc: Client, unique: str
) -> None:
    """A worker that acks a job and then sends nothing (frozen inside its start hold;
    here: a hold and a keepalive interval longer than the test) does not hold the
    request until its dispatch deadline: after two silent keepalive periods the
    gateway runs it on another replica, and the silent attempt sends nothing later."""
    model = f"mute-{unique}"
    gw = await fabric.gateway(keepalive_timeout=1.0, dispatch_timeout=30)
    assert gw.gateway is not None
    spy = await _spy(nc, gw.gateway.gateway_id)
    silent = {"start_hold_ms": 600_000, "keepalive_interval": 600, "drain_timeout": 0.5}
    mute = await fabric.worker(model, max_concurrency=1, ttft_ms=3000, worker=silent)
    client = await fabric.client(gw, timeout=30)
    call = asyncio.create_task(
        client.chat.completions.create(model=model, messages=MSG, max_tokens=4)
    )
    await until(lambda: mute.inflight == 1)
    live = await fabric.worker(model, max_concurrency=1)
    t0 = time.monotonic()
    r = await call
    assert len((r.choices[0].message.content or "").split()) == 4
    assert time.monotonic() - t0 < 5, "retried after two keepalive periods, not at 30 s"
    assert live.jobs_completed == 1
    # The silent attempt is fenced at its first frame (3 s): nothing of it goes out.
    await until(lambda: mute.jobs_fenced == 1 and mute.inflight == 0, 10)
    assert {a for _, a, _, _ in spy.frames} == {"2"}, spy.frames
    assert [k for _, _, k, _ in spy.frames].count("end") == 1, spy.frames
