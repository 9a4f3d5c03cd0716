"""Every bad input and overload path gets the right status and an OpenAI error body."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import openai
import pytest

from nebula.settings import NatsSettings
from tests.conftest import Fabric

MSG = [{"role": "user", "content": "hello"}]


def _error(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert isinstance(err, dict) and err["message"] and err["type"]
    return err


@pytest.fixture
async def http(fabric: Fabric, unique: str) -> httpx.AsyncClient:
    gw = await fabric.gateway()
    await fabric.worker(f"bad-{unique}")
    return await fabric.stack.enter_async_context(httpx.AsyncClient(base_url=gw.base_url))


async def test_malformed_json(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert "not valid JSON" in str(_error(r)["message"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSG}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": 5, "messages": MSG}, "model"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": MSG, "temperature": 9}, "temperature"),
    ],
)
async def test_invalid_fields_name_param(
    http: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


async def test_completions_missing_prompt(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json={"model": "m"})
    assert r.status_code == 400 and _error(r)["param"] == "prompt"


async def test_not_an_object(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400


async def test_unknown_model_404(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway()
    client = await fabric.client(gw)
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model=f"nope-{unique}", messages=MSG)
    assert e.value.code == "model_not_found"


async def test_unknown_route_is_openai_shaped(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/nothing-here")
    assert r.status_code == 404 and _error(r)


async def test_oversized_body_413_with_openai_client(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway(max_body_bytes=1024 * 1024)
    await fabric.worker(f"big-{unique}")
    client = await fabric.client(gw)
    huge = [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model=f"big-{unique}", messages=huge)
    assert e.value.status_code == 413
    assert "limit" in e.value.message


async def test_oversized_chunked_body_413(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway(max_body_bytes=64 * 1024)

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b"x" * 4096

    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        r = await http.post("/v1/chat/completions", content=body())
    assert r.status_code == 413 and _error(r)["type"] == "invalid_request_error"


async def test_body_within_default_limit_is_served(fabric: Fabric, unique: str) -> None:
    """A 6 MiB prompt (under the 8 MiB default) crosses NATS as one job."""
    gw = await fabric.gateway()
    await fabric.worker(f"large-{unique}")
    client = await fabric.client(gw)
    big = [{"role": "user", "content": "word " * (6 * 1024 * 1024 // 5)}]
    r = await client.chat.completions.create(model=f"large-{unique}", messages=big)
    assert r.usage is not None and r.usage.prompt_tokens > 1_000_000


async def test_queue_full_429_with_retry_after(fabric: Fabric, unique: str) -> None:
    from nebula.admin import LoadRequest

    model = f"q-{unique}"
    gw = await fabric.gateway(dispatch_timeout=20)
    assert gw.gateway is not None and gw.gateway.admin is not None
    await gw.gateway.admin.load(LoadRequest(name=model, engine="sim", max_queue=2))
    # A second gateway with other settings changes nothing: the bound is the model's.
    other = await fabric.gateway(dispatch_timeout=3, stream_window=4096)
    worker = await fabric.worker(model, max_concurrency=1, ttft_ms=1500)
    client = await fabric.client(gw)

    def send() -> asyncio.Task[object]:
        return asyncio.create_task(client.chat.completions.create(model=model, messages=MSG))

    # One running, two waiting: the queue is full.
    running = [send()]
    while worker.inflight == 0:
        await asyncio.sleep(0.01)
    running += [send(), send()]
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        r = await http.post("/v1/chat/completions", json={"model": model, "messages": MSG})
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    err = _error(r)
    assert err["code"] == "queue_full" and "2 requests" in str(err["message"])
    async with httpx.AsyncClient(base_url=other.base_url) as http:
        r = await http.post("/v1/chat/completions", json={"model": model, "messages": MSG})
    assert r.status_code == 429
    done = await asyncio.gather(*running)  # nothing queued was lost
    assert len(done) == 3
    await gw.gateway.admin.unload(model)


async def test_deadline_in_queue_504_and_never_run(fabric: Fabric, unique: str) -> None:
    model = f"dl-{unique}"
    gw = await fabric.gateway(dispatch_timeout=1.0)
    worker = await fabric.worker(model, max_concurrency=1, ttft_ms=2500)
    client = await fabric.client(gw)
    first = asyncio.create_task(client.chat.completions.create(model=model, messages=MSG))
    await asyncio.sleep(0.2)
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model=model, messages=MSG)
    assert e.value.status_code == 504
    await first
    await asyncio.sleep(0.5)  # the slot is free again: a withdrawn job would start now
    assert worker.jobs_started == 1


async def test_no_ready_replica_503(
    fabric: Fabric, nats_settings: NatsSettings, unique: str
) -> None:
    """A worker process dies (SIGKILL); its model is known but has no live replica."""
    model = f"dead-{unique}"
    gw = await fabric.gateway(dispatch_timeout=1.0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "worker", "--model", model,
        "--nats-url", nats_settings.url,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    client = await fabric.client(gw)
    try:
        for _ in range(100):
            if model in {m.id async for m in client.models.list()}:
                break
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        for _ in range(100):
            if model not in {m.id async for m in client.models.list()}:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model=model, messages=MSG)
        assert e.value.status_code == 503
        assert model in e.value.message
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_invalid_utf8_and_deep_nesting_are_400(http: httpx.AsyncClient, unique: str) -> None:
    model = f"bad-{unique}"
    head = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": '
    bad_utf8 = head + b'"\xff\xfe"}]}'
    deep = head + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    hidden = head + b'"hi"}], "vendor_field": "\xc3\x28"}'  # in a field Nebula skips
    for body in (bad_utf8, deep, hidden, b"[" * 100_000 + b"]" * 100_000):
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            r = await http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, r.text[:200])
            assert _error(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "robot", "content": "hi"}, "messages[0].role"),
        ({"role": "user", "content": None}, "messages[0].content"),
        ({"role": "user"}, "messages[0].content"),
        ({"role": "system", "content": None}, "messages[0].content"),
        ({"role": "tool", "content": "42"}, "messages[0].tool_call_id"),
        ({"role": "user", "content": [{"text": "no type"}]}, "messages[0].content[0]"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[0].content[0].text"),
        ({"role": "user", "content": ["not an object"]}, "messages[0].content[0]"),
    ],
)
async def test_roles_and_content_shapes_are_validated(
    http: httpx.AsyncClient, unique: str, message: dict[str, object], param: str
) -> None:
    body = {"model": f"bad-{unique}", "messages": [message]}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == param


async def test_valid_message_shapes_pass(http: httpx.AsyncClient, unique: str) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]  # fmt: skip
    r = await http.post(
        "/v1/chat/completions", json={"model": f"bad-{unique}", "messages": messages}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["refusal"] is None


async def test_max_tokens_beyond_the_models_limit_is_400(fabric: Fabric, unique: str) -> None:
    from nebula.admin import LoadRequest

    gw = await fabric.gateway()
    assert gw.gateway is not None and gw.gateway.admin is not None
    loaded = f"limit-{unique}"
    await gw.gateway.admin.load(LoadRequest(name=loaded, engine="sim", replicas=1))
    for _ in range(100):
        if gw.gateway.models.spec(loaded) is not None:
            break
        await asyncio.sleep(0.02)
    unloaded = f"nospec-{unique}"
    worker = await fabric.worker(unloaded)
    client = await fabric.client(gw)
    with pytest.raises(openai.BadRequestError) as e:  # the gateway knows the spec's limit
        await client.chat.completions.create(model=loaded, messages=MSG, max_tokens=10**12)
    assert e.value.body["param"] == "max_tokens" and "32768" in e.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:  # a hand-started worker checks its own
        await client.chat.completions.create(
            model=unloaded, messages=MSG, max_completion_tokens=10**12
        )
    assert e.value.body["param"] == "max_completion_tokens"  # type: ignore[index]
    assert worker.inflight == 0
    await gw.gateway.admin.unload(loaded)


async def test_huge_max_tokens_within_the_limit_costs_constant_memory(
    fabric: Fabric, unique: str
) -> None:
    """The sim engine generates lazily: a long request neither allocates in proportion
    to max_tokens nor stalls a short request on the same worker."""
    model = f"huge-{unique}"
    gw = await fabric.gateway()
    await fabric.worker(model, worker={"max_output_tokens": 10**9})
    client = await fabric.client(gw)
    long = await client.chat.completions.create(
        model=model, messages=MSG, max_tokens=10**9, stream=True
    )
    got = 0
    async for _ in long:
        got += 1
        if got == 50:
            break
    short = await asyncio.wait_for(
        client.chat.completions.create(model=model, messages=MSG, max_tokens=3), 5
    )
    assert short.choices[0].message.content
    await long.close()
