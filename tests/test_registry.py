"""Watchers and views survive names and values that Nebula did not write."""

from __future__ import annotations

import asyncio
import os
import sys

import httpx
from nats.aio.client import Client

from nebula import natsio, subjects
from nebula.settings import NatsSettings
from tests.conftest import Fabric, until

MSG = [{"role": "user", "content": "hi"}]


def test_malformed_tokens_raise_value_error() -> None:
    for bad in ("bad_ZZ", "x_4", "sp ace", "_", "a_C3"):  # a_C3: half a UTF-8 sequence
        try:
            subjects.model_from_token(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} decoded")


async def test_bad_keys_and_values_are_skipped_and_watching_goes_on(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    gw = await fabric.gateway()
    assert gw.gateway is not None
    js = nc.jetstream()
    workers = await natsio.workers_bucket(js, nats_settings)
    models = await natsio.models_bucket(js, nats_settings)
    await workers.put("bad_ZZ.w1", b"{}")
    await workers.put(subjects.worker_key(f"junk-{unique}", "w1"), b"not json")
    await models.put("bad_ZZ", b"{}")
    await models.put(subjects.model_key(f"junk-{unique}"), b"[1, 2")
    # The watchers keep going: a model that appears afterwards is served.
    model = f"after-{unique}"
    await fabric.worker(model)
    client = await fabric.client(gw)
    await until(lambda: model in gw.gateway.models.ready_models())  # type: ignore[union-attr]
    r = await client.chat.completions.create(model=model, messages=MSG)
    assert r.choices[0].message.content
    await workers.delete("bad_ZZ.w1")
    await models.delete("bad_ZZ")
    await models.delete(subjects.model_key(f"junk-{unique}"))


async def test_undecodable_names_do_not_break_views(
    fabric: Fabric, nc: Client, nats_settings: NatsSettings, unique: str
) -> None:
    """Jobs on subjects Nebula did not name (dead letters, batch items) and requests to
    them are skipped by the admin views, never a 500 or a crash of `model list`."""
    gw = await fabric.gateway()
    assert gw.gateway is not None and gw.gateway.admin is not None
    from nebula.admin import LoadRequest

    await gw.gateway.admin.load(LoadRequest(name=f"view-{unique}", engine="sim"))
    js = nc.jetstream()
    await natsio.ensure_dlq_stream(js, nats_settings)
    await natsio.ensure_batch_streams(js, nats_settings)
    await js.publish(f"{subjects.ROOT}.dlq.bad_ZZ", b"{}")
    await js.publish(f"{subjects.ROOT}.job.bad_ZZ", b"{}")
    await nc.publish(f"{subjects.ROOT}.req.bad_ZZ", b"{}")
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        r = await http.get("/v1/admin/models")
    assert r.status_code == 200, r.text
    for args in (("model", "list"), ("cluster", "status")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nebula.cli", *args, "--nats-url", nats_settings.url,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "Traceback" not in err.decode() and f"view-{unique}" in out.decode()
    await js.purge_stream(subjects.DLQ_STREAM, subject=f"{subjects.ROOT}.dlq.bad_ZZ")
    await js.purge_stream(subjects.JOB_STREAM, subject=f"{subjects.ROOT}.job.bad_ZZ")
    await gw.gateway.admin.unload(f"view-{unique}")


async def test_read_all_never_reads_a_full_bucket_as_empty(nc: Client, unique: str) -> None:
    """nats-py's end-of-snapshot marker can come before the snapshot itself (it asks
    what is pending while the values are already on their way): every read of a bucket
    must still hold every key, and an empty bucket reads as empty."""
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=f"readall-{unique}")
    assert await natsio.read_all(kv) == {}
    keys = {f"k{i}" for i in range(40)}
    await asyncio.gather(*(kv.put(k, b"v") for k in keys))
    await kv.delete("k0")
    for _ in range(60):
        assert set(await natsio.read_all(kv)) == keys - {"k0"}
    await js.delete_key_value(f"readall-{unique}")
