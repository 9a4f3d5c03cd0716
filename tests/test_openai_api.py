"""Happy paths through the whole fabric with the official openai client."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Fabric

MSG = [{"role": "user", "content": "tell me about queues"}]


async def test_chat_non_streaming(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway()
    await fabric.worker(f"chat-{unique}", max_tokens=12)
    client = await fabric.client(gw)
    r = await client.chat.completions.create(model=f"chat-{unique}", messages=MSG)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content.split()) == 12  # type: ignore[union-attr]
    # The official schema: `refusal` is present, null.
    assert "refusal" in r.choices[0].message.model_fields_set
    assert r.choices[0].message.refusal is None
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == 5  # 4 words + 1 for the message
    assert r.usage.total_tokens == 17


async def test_chat_streaming_with_usage(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway()
    await fabric.worker(f"chat-{unique}")
    client = await fabric.client(gw)
    stream = await client.chat.completions.create(
        model=f"chat-{unique}",
        messages=MSG,
        stream=True,
        max_tokens=40,
        stream_options={"include_usage": True},
    )
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len("".join(text).split()) == 40
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 40


async def test_streaming_is_deterministic_and_matches_unary(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway()
    await fabric.worker(f"det-{unique}")
    client = await fabric.client(gw)
    unary = await client.chat.completions.create(model=f"det-{unique}", messages=MSG)
    stream = await client.chat.completions.create(model=f"det-{unique}", messages=MSG, stream=True)
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == unary.choices[0].message.content


async def test_legacy_completions(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway()
    await fabric.worker(f"cmp-{unique}")
    client = await fabric.client(gw)
    r = await client.completions.create(model=f"cmp-{unique}", prompt="once upon", max_tokens=7)
    assert r.object == "text_completion"
    assert len(r.choices[0].text.split()) == 7
    assert r.usage is not None and r.usage.prompt_tokens == 2
    stream = await client.completions.create(
        model=f"cmp-{unique}", prompt="once upon", max_tokens=7, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == r.choices[0].text


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen2.5-0.5B-Instruct", "llama3:8b", "a.b", "star*gt>", "with space"]
)
async def test_model_names_with_special_characters(fabric: Fabric, unique: str, name: str) -> None:
    model = f"{name}-{unique}"
    gw = await fabric.gateway()
    await fabric.worker(model)
    client = await fabric.client(gw)
    r = await client.chat.completions.create(model=model, messages=MSG)
    assert r.model == model
    ids = [m.id async for m in client.models.list()]
    assert model in ids


async def test_models_list_shows_live_models_only(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway()
    w = await fabric.worker(f"live-{unique}")
    client = await fabric.client(gw)
    models = {m.id: m async for m in client.models.list()}
    assert models[f"live-{unique}"].owned_by == "nebula (simulated engine)"
    assert models[f"live-{unique}"].object == "model"
    await w.close()  # a clean stop removes the heartbeat at once
    for _ in range(50):
        if f"live-{unique}" not in {m.id async for m in client.models.list()}:
            break
        await __import__("asyncio").sleep(0.05)
    assert f"live-{unique}" not in {m.id async for m in client.models.list()}


async def test_probes(fabric: Fabric) -> None:
    gw = await fabric.gateway()
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        r = await http.get("/ready")
        assert r.status_code == 200 and r.json()["nats"] == "connected"
        m = await http.get("/metrics")
        assert m.status_code == 200 and "nebula_requests_total" in m.text
