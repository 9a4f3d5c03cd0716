"""The `openai` engine bridges to an OpenAI-compatible server over real HTTP.

Two upstreams: another Nebula gateway (a real OpenAI-compatible server), and a
small recording server that proves unknown fields reach the upstream untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nebula.protocol import Endpoint
from nebula.settings import OpenAIUpstreamSettings, WorkerSettings
from tests.conftest import Fabric, until
from workers.engines import upstream
from workers.engines.base import Job, Output
from workers.engines.openai_bridge import ChunkProbe, OpenAIEngine
from workers.runner import WorkerProcess

MSG = [{"role": "user", "content": "bridge me"}]


async def _bridge(fabric: Fabric, model: str, url: str, upstream_model: str | None) -> None:
    engine = OpenAIEngine(OpenAIUpstreamSettings(url=url, upstream_model=upstream_model))
    await fabric.stack.enter_async_context(
        WorkerProcess(WorkerSettings(model=model), fabric.nats, engine)
    )


async def test_bridge_to_another_openai_server(fabric: Fabric, unique: str) -> None:
    upstream = await fabric.gateway()
    await fabric.worker(f"origin-{unique}", max_tokens=9)
    gw = await fabric.gateway()
    await _bridge(fabric, f"bridged-{unique}", upstream.base_url + "/v1", f"origin-{unique}")
    client = await fabric.client(gw)

    r = await client.chat.completions.create(model=f"bridged-{unique}", messages=MSG)
    assert len(r.choices[0].message.content.split()) == 9  # type: ignore[union-attr]
    assert r.model == f"bridged-{unique}"  # the name the client asked for, not upstream's
    assert r.usage is not None and r.usage.completion_tokens == 9

    # Usage was requested upstream for accounting but the client did not ask: none shown.
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model=f"bridged-{unique}", messages=MSG, stream=True
        )
    ]
    assert all(c.usage is None for c in chunks)
    assert {c.model for c in chunks} == {f"bridged-{unique}"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content

    chunks = [
        c
        async for c in await client.chat.completions.create(
            model=f"bridged-{unique}",
            messages=MSG,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9

    comp = await client.completions.create(model=f"bridged-{unique}", prompt="a b", max_tokens=3)
    assert len(comp.choices[0].text.split()) == 3


class Recorder:
    """A minimal OpenAI-compatible upstream that records what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.peers: list[int] = []  # client port of each request: one port = one connection
        self.port = 0

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "rec", "object": "model"}]})

        async def chat(request: Request) -> Response:
            body = await request.json()
            self.bodies.append(body)
            assert request.client is not None
            self.peers.append(request.client.port)
            if body.get("temperature") == 1.5:  # an upstream refusal, passed on as it is
                return JSONResponse(
                    {
                        "error": {
                            "message": "upstream says no",
                            "type": "BadRequestError",
                            "param": "temperature",
                            "code": 400,  # vLLM sends a number here
                        }
                    },
                    status_code=400,
                )
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "rec",
                "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}],
            }
            if not body.get("stream"):
                return JSONResponse(
                    {
                        "id": "c1",
                        "object": "chat.completion",
                        "created": 1,
                        "model": "rec",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "ok"},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                )

            async def events() -> AsyncIterator[bytes]:
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                usage = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "rec",
                    "choices": [],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                yield b"data: " + json.dumps(usage).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/v1/chat/completions", chat, methods=["POST"]),
            ]
        )


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    server = uvicorn.Server(uvicorn.Config(rec.app(), port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    rec.port = server.servers[0].sockets[0].getsockname()[1]
    yield rec
    server.should_exit = True
    with contextlib.suppress(Exception):
        await task


async def test_bridge_passes_unknown_fields_untouched(
    fabric: Fabric, unique: str, recorder: Recorder
) -> None:
    gw = await fabric.gateway()
    model = f"rec-{unique}"
    await _bridge(fabric, model, f"http://127.0.0.1:{recorder.port}/v1", None)
    client = await fabric.client(gw)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    extra = {"vendor_knob": {"nested": [1, 2, 3]}, "top_k": 7}
    r = await client.chat.completions.create(
        model=model,
        messages=MSG,
        tools=tools,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        extra_body=extra,
    )
    assert r.choices[0].message.content == "ok"
    sent = recorder.bodies[-1]
    assert sent["tools"] == tools and sent["response_format"] == {"type": "json_object"}
    assert sent["vendor_knob"] == {"nested": [1, 2, 3]} and sent["top_k"] == 7
    assert sent["model"] == model

    stream = await client.chat.completions.create(
        model=model,
        messages=MSG,
        stream=True,
        tools=tools,  # type: ignore[arg-type]
        extra_body=extra,
    )
    assert [c.choices[0].delta.content async for c in stream if c.choices] == ["ok"]
    sent = recorder.bodies[-1]
    assert sent["tools"] == tools and sent["vendor_knob"] == {"nested": [1, 2, 3]}
    assert sent["stream_options"] == {"include_usage": True}

    # Streams are read to their end, so one keep-alive connection serves them all.
    for _ in range(3):
        stream = await client.chat.completions.create(model=model, messages=MSG, stream=True)
        assert [c.choices[0].delta.content async for c in stream if c.choices] == ["ok"]
    assert len(set(recorder.peers[-4:])) == 1


async def test_bridge_relays_upstream_error_status(
    fabric: Fabric, unique: str, recorder: Recorder
) -> None:
    gw = await fabric.gateway()
    model = f"recerr-{unique}"
    await _bridge(fabric, model, f"http://127.0.0.1:{recorder.port}/v1", None)
    client = await fabric.client(gw)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(
                model=model, messages=MSG, temperature=1.5, stream=stream
            )
        # The upstream's error body reaches the client as the upstream wrote it.
        assert e.value.message == "Error code: 400 - upstream says no"
        assert e.value.body == {
            "message": "upstream says no", "type": "BadRequestError", "param": "temperature",
            "code": 400,
        }  # fmt: skip


async def test_bridge_refuses_unreachable_upstream() -> None:
    from nebula.errors import Unavailable

    engine = OpenAIEngine(OpenAIUpstreamSettings(url="http://127.0.0.1:9/v1"))
    with pytest.raises(Unavailable):
        await engine.start()
    await engine.stop()


async def test_bridge_client_disconnect_aborts_upstream(fabric: Fabric, unique: str) -> None:
    """The client leaves mid-stream: the bridge closes its upstream request, and the
    upstream (another Nebula, whose worker we can watch) cancels the generation."""
    upstream = await fabric.gateway()
    origin = await fabric.worker(f"origin-{unique}", itl_ms=20, max_tokens=500)
    gw = await fabric.gateway()
    await _bridge(fabric, f"far-{unique}", upstream.base_url + "/v1", f"origin-{unique}")
    client = await fabric.client(gw)
    stream = await client.chat.completions.create(model=f"far-{unique}", messages=MSG, stream=True)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()
    t0 = time.monotonic()
    while not origin.jobs_cancelled and time.monotonic() - t0 < 3:
        await asyncio.sleep(0.01)
    print(f"upstream generation aborted {time.monotonic() - t0:.3f}s after the client left")
    assert origin.jobs_cancelled == 1 and origin.inflight == 0


def _events(outs: list[Output]) -> list[dict[str, Any]]:
    """The JSON events of a stream's framed Outputs (whole ``data: ...`` SSE events)."""
    assert all(o.framed for o in outs if o.chunk)
    return [
        json.loads(e[6:]) for o in outs for e in o.chunk.split(b"\n\n") if e.startswith(b"data: ")
    ]


def _job(body: dict[str, Any], *, stream: bool) -> Job:
    return Job(
        request_id="r1",
        model=body["model"],
        endpoint=Endpoint.CHAT,
        body=json.dumps(body).encode(),
        stream=stream,
        include_usage=False,
    )


async def test_bridge_sends_again_when_a_kept_alive_connection_was_dropped() -> None:
    """A server may close an idle keep-alive connection just as a request goes out on
    it (uvicorn does after 5 s): nothing of an answer came back, so the bridge sends the
    request again on a fresh connection instead of failing the job."""
    connections = 0
    answer = json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "ok", "refusal": None},
                }
            ],
        }
    ).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers the first request of each connection; drops it on the second."""
        nonlocal connections
        connections += 1
        try:
            for served in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"content-length: *(\d+)", head, re.I)
                await reader.readexactly(int(m.group(1)) if m else 0)
                if served:
                    break  # the keep-alive timer fired as this request arrived
                body = answer if head.startswith(b"POST") else b'{"object":"list","data":[]}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = OpenAIEngine(OpenAIUpstreamSettings(url=f"http://127.0.0.1:{port}/v1"))
    try:
        await engine.start()  # GET /models: connection 1
        for i in range(3):
            outs = [o async for o in engine.generate(_job({"model": "m"}, stream=False))]
            assert json.loads(outs[0].chunk)["choices"][0]["message"]["content"] == "ok"
            assert connections == i + 2  # each dropped connection replaced once
    finally:
        await engine.stop()
        server.close()
        await server.wait_closed()


async def test_bridge_stops_reading_a_stream_nobody_takes() -> None:
    """Backpressure reaches the upstream: while the worker takes no output (its client
    reads nothing), the bridge stops reading the socket, the upstream's sends block,
    and what the bridge holds stays bounded; leaving closes the upstream request."""
    event = (
        b"data: "
        + json.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "big",
                "choices": [{"index": 0, "delta": {"content": "x" * 900}, "finish_reason": None}],
            }
        ).encode()
        + b"\n\n"
    )
    total = 100_000  # ~100 MB if nothing held it back
    sent = 0
    ended = asyncio.Event()

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": []})

    async def chat(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            nonlocal sent
            try:
                for _ in range(total):
                    sent += 1
                    yield event
            finally:
                ended.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    )
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    engine = OpenAIEngine(OpenAIUpstreamSettings(url=f"http://127.0.0.1:{port}/v1"))
    try:
        await engine.start()
        gen = engine.generate(_job({"model": "big", "stream": True}, stream=True))
        first = await anext(gen)
        assert first.tokens >= 1 and first.framed
        # The upstream's sends stop growing once the socket buffers are full.
        last = -1
        while sent != last:
            last = sent
            await asyncio.sleep(0.3)
        assert sent < total and not ended.is_set()
        (conn,) = engine._pool.busy
        assert conn.buffered <= upstream._HIGH_WATER + 1024 * 1024, conn.buffered
        # Taking output again lets it go on (once the socket buffers have drained)...
        taken = 1
        while sent == last:
            await anext(gen)
            taken += 1
        assert taken < total
        # ...and leaving closes the connection (how an upstream learns to abort).
        await gen.aclose()
        assert not engine._pool.busy and not engine._pool._idle
        await until(lambda: not server.server_state.connections)
    finally:
        await engine.stop()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_bridge_speaks_https(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cloud APIs are https: the bridge verifies the server's certificate (against the
    system's trust store, which SSL_CERT_FILE points at here) and streams over TLS."""
    cert, key = _self_signed(tmp_path)
    server = uvicorn.Server(
        uvicorn.Config(
            recorder.app(),
            port=0,
            log_level="warning",
            lifespan="off",
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
        )
    )
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started)
    url = f"https://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    untrusted = OpenAIEngine(OpenAIUpstreamSettings(url=url))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    engine = OpenAIEngine(OpenAIUpstreamSettings(url=url))
    try:
        assert not await untrusted.health()  # an unknown certificate is refused
        await engine.start()
        job = _job({"model": "rec", "stream": True}, stream=True)
        for _ in range(2):
            outs = [o async for o in engine.generate(job)]
            text = [e["choices"][0]["delta"]["content"] for e in _events(outs) if e["choices"]]
            assert text == ["ok"]
        assert len(set(recorder.peers[-2:])) == 1  # one TLS connection, kept alive
    finally:
        await untrusted.stop()
        await engine.stop()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


async def test_bridge_reads_answers_that_end_with_the_connection() -> None:
    """An upstream without Content-Length or chunking (HTTP/1.0 style) ends its answer by
    closing: the bridge takes the body up to EOF and opens a new connection next time."""
    connections = 0
    events = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % w
        for w in (b"one", b"two")
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"content-length: *(\d+)", head, re.I)
        await reader.readexactly(int(m.group(1)) if m else 0)
        stream = head.startswith(b"POST")
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: %s\r\n\r\n"
            % (b"text/event-stream" if stream else b"application/json")
        )
        writer.write(events + b"data: [DONE]" if stream else b'{"object":"list","data":[]}')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = OpenAIEngine(OpenAIUpstreamSettings(url=f"http://127.0.0.1:{port}/v1"))
    try:
        await engine.start()
        for i in range(2):
            outs = [o async for o in engine.generate(_job({"model": "m"}, stream=True))]
            words = [e["choices"][0]["delta"]["content"] for e in _events(outs)]
            assert words == ["one", "two"]
            assert connections == i + 2 and not engine._pool._idle
    finally:
        await engine.stop()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("delta", "tokens"),
    [
        ('{"tool_calls": [{"index": 0, "function": {"arguments": "{\\"c"}}]}', 1),
        ('{"tool_calls": []}', 0),
        ('{"tool_calls": null, "content": "x"}', 1),
        ('{"role": "assistant"}', 0),
    ],
)
def test_chunk_probe_reads_tool_call_deltas(delta: str, tokens: int) -> None:
    """A streamed tool call (vLLM's hermes parser sends its arguments as deltas) is
    output like text: it once failed the probe, and so the stream."""
    chunk = f'{{"choices": [{{"index": 0, "delta": {delta}}}]}}'.encode()
    assert msgspec.json.decode(chunk, type=ChunkProbe).tokens() == tokens


def test_bridge_refuses_bad_upstream_settings() -> None:
    from nebula.errors import InvalidRequest

    for settings in (
        OpenAIUpstreamSettings(url="ftp://127.0.0.1/v1"),
        OpenAIUpstreamSettings(url="127.0.0.1:8000/v1"),
        OpenAIUpstreamSettings(url="http://127.0.0.1/v1", api_key="k\r\nX-Injected: 1"),
    ):
        with pytest.raises(InvalidRequest) as e:
            OpenAIEngine(settings)
        assert e.value.param in ("upstream_url", "upstream_api_key")
