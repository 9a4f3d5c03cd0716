"""Model lifecycle through the admin API and the CLI: round trips and bad inputs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from nebula.settings import NatsSettings
from tests.conftest import Fabric


@pytest.fixture
async def admin_http(fabric: Fabric) -> AsyncIterator[httpx.AsyncClient]:
    gw = await fabric.gateway()
    async with httpx.AsyncClient(base_url=gw.base_url + "/v1/admin") as http:
        yield http


async def test_admin_load_list_unload_round_trip(
    admin_http: httpx.AsyncClient, unique: str
) -> None:
    name = f"org/adm.{unique}:v1"
    r = await admin_http.post(
        "/models",
        json={"name": name, "engine": "sim", "replicas": 2, "labels": {"zone": "eu"},
              "engine_options": {"ttft_ms": "5"}},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["replicas"] == 2
    listed = {m["name"]: m for m in (await admin_http.get("/models")).json()["data"]}
    assert listed[name]["replicas"] == 2 and listed[name]["ready"] == 0
    assert listed[name]["state"] == "Pending"
    one = await admin_http.get(f"/models/{name}")
    assert one.status_code == 200 and one.json()["name"] == name
    dup = await admin_http.post("/models", json={"name": name, "engine": "sim"})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"
    gone = await admin_http.delete(f"/models/{name}")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert name not in {m["name"] for m in (await admin_http.get("/models")).json()["data"]}
    again = await admin_http.delete(f"/models/{name}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"name": "m", "engine": "tensorflow"}, "engine", "unknown engine"),
        ({"name": "m", "engine": "hf"}, "model_path", "needs a model path"),
        ({"name": "m", "engine": "sim", "engine_args": ["--x"]}, "engine_args", "no engine args"),
        (
            {"name": "m", "engine": "sim", "engine_options": {"ttft_ms": "soon"}},
            "ttft_ms",
            "must be a number",
        ),
        ({"name": "m", "engine": "sim", "replicas": 0}, "replicas", "1 or more"),
        ({"name": "m", "engine": "sim", "replicas": -3}, "replicas", "1 or more"),
        ({"name": "m", "engine": "sim", "gpu_memory": 1.5}, "gpu_memory", "between 0 and 1"),
        ({"name": "m", "engine": "sim", "gpu_memory": -0.1}, "gpu_memory", "between 0 and 1"),
        ({"name": "", "engine": "sim"}, "name", "empty"),
        ({"name": "m", "engine": "openai"}, "upstream_url", "upstream_url"),
        (
            {"name": "m", "engine": "sim", "engine_options": {"bogus": "1"}},
            "engine_options",
            "bogus",
        ),
        ({"name": "m", "engine": "sim", "replicas": "two"}, "replicas", "Expected `int`"),
        ({"name": "m", "engine": "sim", "colour": "red"}, "colour", "unknown field"),
        ({"engine": "sim"}, "name", "missing required field"),
    ],
)
async def test_admin_rejects_bad_loads(
    admin_http: httpx.AsyncClient, body: dict[str, object], param: str, words: str
) -> None:
    r = await admin_http.post("/models", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert words in err["message"]


async def test_admin_malformed_json(admin_http: httpx.AsyncClient) -> None:
    r = await admin_http.post("/models", content=b"{nope")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


async def test_admin_nodes_lists_heartbeats(admin_http: httpx.AsyncClient) -> None:
    r = await admin_http.get("/nodes")
    assert r.status_code == 200 and r.json()["object"] == "list"


async def _cli(nats_url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", *args,
        env={**os.environ, "NEBULA_NATS_URL": nats_url, "PYTHONPATH": os.getcwd()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_model_lifecycle(nats_settings: NatsSettings, unique: str) -> None:
    url = nats_settings.url
    name = f"cli-{unique}"
    rc, out, err = await _cli(
        url,
        "model",
        "load",
        name,
        "--engine",
        "sim",
        "--replicas",
        "3",
        "--ttft-ms",
        "10",
        "--label",
        "gpu=none",
        "--no-wait",
    )
    assert rc == 0, err
    rc, out, _ = await _cli(url, "model", "list", "--json")
    models = {m["name"]: m for m in json.loads(out)}
    assert models[name]["replicas"] == 3
    assert models[name]["spec"]["engine_options"] == {"ttft_ms": "10"}
    assert models[name]["spec"]["labels"] == {"gpu": "none"}
    rc, out, _ = await _cli(url, "model", "list")
    assert rc == 0 and name in out and "0/3" in out
    rc, _, err = await _cli(url, "model", "launch", name, "--engine", "sim", "--no-wait")
    assert rc == 1 and "already loaded" in err and "Traceback" not in err
    rc, out, _ = await _cli(url, "cluster", "status")
    assert rc == 0 and "NODES" in out and name in out
    rc, _, err = await _cli(url, "model", "terminate", name)
    assert rc == 0, err
    rc, _, err = await _cli(url, "model", "unload", name)
    assert rc == 1 and "not loaded" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--engine", "sim", "--replicas", "0"], "replicas must be 1 or more"),
        (["--engine", "sim", "--gpu-memory", "1.5"], "between 0 and 1"),
        (["--engine", "nope"], "unknown engine"),
        (["--engine", "hf"], "needs a model path"),
        (["--engine", "sim", "--label", "novalue"], "not key=value"),
    ],
)
async def test_cli_bad_loads(nats_settings: NatsSettings, args: list[str], words: str) -> None:
    rc, _, err = await _cli(nats_settings.url, "model", "load", "m-bad", *args, "--no-wait")
    assert rc == 1 and words in err and "Traceback" not in err


async def test_cli_unreachable_nats() -> None:
    rc, _, err = await _cli("nats://127.0.0.1:1", "model", "list")
    assert rc == 1 and "cannot reach NATS" in err and "Traceback" not in err


async def test_adapter_requests_that_cannot_work_say_why(
    admin_http: httpx.AsyncClient, unique: str
) -> None:
    name = f"adp-{unique}"
    r = await admin_http.post(
        "/models", json={"name": name, "engine": "sim", "adapters": {"a": "/lora/a"}}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "adapters" and "does not serve LoRA adapters" in err["message"]
    assert (
        await admin_http.post("/models", json={"name": name, "engine": "sim"})
    ).status_code == 201
    add = await admin_http.post(f"/models/{name}/adapters", json={"name": "a", "path": "/lora/a"})
    assert add.status_code == 400 and "serves no adapters" in add.json()["error"]["message"]
    clash = await admin_http.post(
        f"/models/{name}/adapters", json={"name": name, "path": "/lora/a"}
    )
    assert clash.status_code == 400 and "name of its base model" in clash.text
    bad = await admin_http.post(f"/models/{name}/adapters", json={"name": "a"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
    missing = await admin_http.post("/models/no-such/adapters", json={"name": "a", "path": "/x"})
    assert missing.status_code == 404
    gone = await admin_http.delete(f"/models/{name}/adapters/a")
    assert gone.status_code == 404 and "has no adapter" in gone.json()["error"]["message"]
    # The model itself is untouched by all of that.
    assert (await admin_http.delete(f"/models/{name}")).status_code == 200
