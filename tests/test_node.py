"""Node agents with real worker processes, a real scheduler and a real nats-server.

Each test starts its own nats-server (clean KV: the scheduler places every model
it sees on every live node, so tests must not share buckets), a scheduler with
short node timeouts, and node agents with simulated GPU inventories.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import openai
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from nebula import natsio, subjects
from nebula.embedded import EmbeddedNats
from nebula.errors import InvalidRequest
from nebula.protocol import ModelSpec, NodeInfo, Placement, PlacementState
from nebula.scheduler import Scheduler
from nebula.settings import NatsSettings, NodeSettings, SchedulerSettings, parse_labels
from tests.conftest import Fabric, fresh_nats
from workers import gpu
from workers.node import NodeAgent, describe_exit, log_tail, safe_token

MSG = [{"role": "user", "content": "hello nodes"}]
GiB = 1 << 30
READY = PlacementState.READY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(
    check: Callable[[], Any], timeout: float = 20.0, what: str = "condition", every: float = 0.1
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


@dataclass
class Cluster:
    server: EmbeddedNats
    nats: NatsSettings
    nc: Client
    stack: contextlib.AsyncExitStack
    tmp: Path
    fabric: Fabric
    models: KeyValue
    placements_kv: KeyValue
    nodes_kv: KeyValue

    async def scheduler(self, **kw: Any) -> Scheduler:
        settings = SchedulerSettings(
            **{"strategy": "spread", "lease_ttl": 1.0, "node_ttl": 1.5, "node_grace": 1.0, **kw}
        )
        s = Scheduler(self.nc, settings, nats_settings=self.nats)
        return await self.stack.enter_async_context(s)

    def node_settings(self, node_id: str, **kw: Any) -> NodeSettings:
        return NodeSettings(
            **{
                "node_id": node_id,
                "simulated_gpus": "1x80GiB",
                "log_dir": self.tmp / "logs" / node_id,
                "heartbeat_interval": 0.5,
                "backoff_initial": 0.2,
                "backoff_max": 1.0,
                "stop_timeout": 10.0,
                **kw,
            }
        )

    async def agent(self, node_id: str, **kw: Any) -> NodeAgent:
        agent = NodeAgent(self.node_settings(node_id, **kw), self.nats)
        return await self.stack.enter_async_context(agent)

    async def load(self, name: str, **kw: Any) -> ModelSpec:
        spec = ModelSpec(**{"name": name, "engine": "sim", "created_at": time.time(), **kw})
        await self.models.put(subjects.model_key(name), msgspec.json.encode(spec))
        return spec

    async def unload(self, name: str) -> None:
        await self.models.delete(subjects.model_key(name))

    async def placement(self, model: str, replica: int) -> Placement | None:
        try:
            entry = await self.placements_kv.get(subjects.placement_key(model, replica))
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=Placement)

    async def replicas(self, model: str, n: int) -> list[Placement | None]:
        return [await self.placement(model, i) for i in range(n)]

    async def wait_ready(self, model: str, n: int, timeout: float = 20.0) -> list[Placement]:
        async def check() -> list[Placement] | None:
            ps = await self.replicas(model, n)
            if all(p is not None and p.state is READY for p in ps):
                return [p for p in ps if p is not None]
            return None

        ready: list[Placement] = await wait_until(check, timeout, f"{n} ready replicas of {model}")
        return ready

    async def node_info(self, node_id: str) -> NodeInfo:
        entry = await self.nodes_kv.get(subjects.node_key(node_id))
        return msgspec.json.decode(entry.value or b"", type=NodeInfo)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    server = await fresh_nats(tmp_path / "nats")
    try:
        async with contextlib.AsyncExitStack() as stack:
            ns = NatsSettings(url=server.url)
            nc = await natsio.connect(ns, name="test-node")
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            yield Cluster(
                server=server,
                nats=ns,
                nc=nc,
                stack=stack,
                tmp=tmp_path,
                fabric=Fabric(stack, ns),
                models=await natsio.ensure_bucket(js, ns, subjects.MODELS_BUCKET),
                placements_kv=await natsio.ensure_bucket(js, ns, subjects.PLACEMENTS_BUCKET),
                nodes_kv=await natsio.ensure_bucket(
                    js, ns, subjects.NODES_BUCKET, ttl=natsio.NODE_TTL
                ),
            )
    finally:
        await server.close()


async def chat(client: openai.AsyncOpenAI, model: str) -> str:
    r = await client.chat.completions.create(model=model, messages=MSG, max_tokens=4)  # type: ignore[arg-type]
    return r.choices[0].message.content or ""


async def serve_eventually(client: openai.AsyncOpenAI, model: str, timeout: float = 20.0) -> str:
    async def attempt() -> str | None:
        try:
            return await chat(client, model)
        except openai.APIError:
            return None

    text: str = await wait_until(attempt, timeout, f"{model} to serve", every=0.2)
    return text


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is not alive either.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


# --- inventory -------------------------------------------------------------------------


def test_simulated_gpus_parse() -> None:
    gpus = gpu.parse_simulated_gpus("2x80GiB")
    assert [(g.index, g.memory_total, g.memory_free) for g in gpus] == [
        (0, 80 * GiB, 80 * GiB),
        (1, 80 * GiB, 80 * GiB),
    ]
    mixed = gpu.parse_simulated_gpus("80GiB, 2x40GB,24")
    assert [g.index for g in mixed] == [0, 1, 2, 3]
    assert [g.memory_total for g in mixed] == [80 * GiB, 40 * 10**9, 40 * 10**9, 24 * GiB]
    assert gpu.parse_simulated_gpus("") == [] and gpu.parse_simulated_gpus("none") == []
    for bad in ("2x", "eightyGiB", "80 parsecs", "0x80GiB", "2x80GiB,,"):
        with pytest.raises(InvalidRequest):
            gpu.parse_simulated_gpus(bad)
    assert gpu.parse_size("1.5GiB") == int(1.5 * GiB)


def test_nvml_inventory_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    class NVMLError(Exception):
        pass

    calls: list[str] = []
    fake = SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA A10",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 * GiB, free=(70 + h) * GiB),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inv = gpu.GpuInventory()
    assert inv.source == "nvml"
    gpus = inv.read()
    assert [(g.index, g.name, g.memory_free) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 70 * GiB),
        (1, "NVIDIA A10", 71 * GiB),
    ]

    def broken() -> int:
        raise NVMLError("GPU is lost")

    fake.nvmlDeviceGetCount = broken
    assert inv.read() == [] and inv.source == "none"  # a driver failure: no GPUs, no crash
    inv.close()
    assert calls == ["init", "shutdown"]

    def no_driver() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver
    assert gpu.nvml_gpus() == []


def test_cpu_memory_and_helpers(tmp_path: Path) -> None:
    assert gpu.cpu_count() >= 1
    total, free = gpu.memory()
    assert total > 0 and 0 <= free <= total
    assert safe_token("Qwen/Qwen2.5-0.5B-Instruct", 64) == "Qwen-Qwen2-5-0-5B-Instruct"
    assert safe_token("a/" + "b" * 40) == "a-" + "b" * 22
    assert safe_token("...") == "x"
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exited with code 3"
    log = tmp_path / "w.log"
    log.write_text("old run\n--- marker\n" + "".join(f"line {i}\n" for i in range(30)))
    tail = log_tail(log, offset=len("old run\n"))
    assert tail.splitlines()[-1] == "line 29" and "old run" not in tail
    assert len(tail.splitlines()) == 12
    assert log_tail(tmp_path / "missing.log") == ""


def test_node_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEBULA_NODE_ID", "gpu-7")
    monkeypatch.setenv("NEBULA_NODE_LABELS", "zone=a, gpu=h100")
    monkeypatch.setenv("NEBULA_SIMULATED_GPUS", "2x80GiB")
    s = NodeSettings.from_env(max_crashes=3)
    assert s.node_id == "gpu-7" and s.labels == {"zone": "a", "gpu": "h100"}
    assert s.simulated_gpus == "2x80GiB" and s.max_crashes == 3
    assert NodeAgent(s).node_id == "gpu-7"


# --- the agent with real workers -----------------------------------------------------------


async def test_load_serve_unload(cluster: Cluster, unique: str) -> None:
    """replicas=2 over two nodes: Ready, served through the gateway, then drained away."""
    await cluster.scheduler()
    a = await cluster.agent("node-a", labels={"zone": "a"})
    b = await cluster.agent("node-b", labels={"zone": "b"})
    model = f"org/sim.chat {unique}"  # '/', '.' and a space must all work
    t0 = time.monotonic()
    await cluster.load(model, replicas=2, gpu_memory=0.25, engine_options={"itl_ms": "40"})
    ps = await cluster.wait_ready(model, 2)
    print(f"2 replicas ready {time.monotonic() - t0:.2f}s after load")
    assert {p.node_id for p in ps} == {"node-a", "node-b"}  # spread
    for agent in (a, b):
        (handle,) = agent.workers.values()
        p = next(p for p in ps if p.node_id == agent.node_id)
        assert p.worker_id == handle.worker_id and p.gpu_ids == [0]
        assert re.fullmatch(r"[A-Za-z0-9-]+", handle.worker_id)
        env = environ(handle.pid)
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert handle.log_file.parent == cluster.tmp / "logs" / agent.node_id
    # Heartbeats carry the inventory; simulated free memory reflects the placements.
    info = await wait_until(
        lambda: _info_with_workers(cluster, "node-a"), 5, "node-a heartbeat with its worker"
    )
    assert info.labels == {"zone": "a"} and info.cpu_count >= 1 and info.memory_total > 0
    assert info.gpus[0].memory_total == 80 * GiB and info.gpus[0].memory_free == 60 * GiB

    gw = await cluster.fabric.gateway()
    client = await cluster.fabric.client(gw)
    assert len((await chat(client, model)).split()) == 4
    pids = [h.pid for ag in (a, b) for h in ag.workers.values()]

    # Unload while a stream is in flight: its worker drains it before it stops.
    stream = await client.chat.completions.create(
        model=model,
        messages=MSG,
        stream=True,
        max_tokens=30,  # type: ignore[arg-type]
    )
    words = [c.choices[0].delta.content or "" async for c in _take(stream, 2)]
    t0 = time.monotonic()
    await cluster.unload(model)
    finish = None
    async for chunk in stream:
        if chunk.choices:
            words.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len("".join(words).split()) == 30 and finish == "length"

    async def gone() -> bool:
        return await cluster.replicas(model, 2) == [None, None]

    await wait_until(gone, 20, "placement keys to be deleted")
    print(f"unloaded (drained, keys deleted) in {time.monotonic() - t0:.2f}s")
    assert a.workers == {} and b.workers == {}
    assert not any(alive(pid) for pid in pids)
    assert a.stats.unloaded == 1 and b.stats.unloaded == 1
    assert a.stats.crashes == 0 and b.stats.crashes == 0


async def _take(stream: Any, n: int) -> AsyncIterator[Any]:
    for _ in range(n):
        yield await anext(stream)


async def _info_with_workers(cluster: Cluster, node_id: str) -> NodeInfo | None:
    info = await cluster.node_info(node_id)
    return info if info.workers == 1 else None


async def test_killed_worker_is_restarted(cluster: Cluster, unique: str) -> None:
    await cluster.scheduler()
    agent = await cluster.agent("node-k")
    model = f"kill-{unique}"
    await cluster.load(model, replicas=1)
    (before,) = await cluster.wait_ready(model, 1)
    (handle,) = agent.workers.values()
    assert before.worker_id == handle.worker_id
    gw = await cluster.fabric.gateway()
    client = await cluster.fabric.client(gw)
    assert await chat(client, model)

    t0 = time.monotonic()
    os.kill(handle.pid, signal.SIGKILL)

    async def replaced() -> Placement | None:
        p = await cluster.placement(model, 0)
        ok = p is not None and p.state is READY and p.worker_id != before.worker_id
        return p if ok else None

    after = await wait_until(replaced, 20, "the restarted worker to be ready")
    print(f"killed worker replaced and Ready in {time.monotonic() - t0:.2f}s")
    (new,) = agent.workers.values()
    assert new.worker_id == after.worker_id and new.pid != handle.pid
    assert agent.stats.crashes == 1 and agent.stats.spawns == 2
    assert await serve_eventually(client, model)


async def test_crash_loop_marks_failed(cluster: Cluster, unique: str) -> None:
    """An openai engine whose upstream does not answer exits at start: Failed with the error."""
    await cluster.scheduler()
    agent = await cluster.agent("node-c", max_crashes=3, backoff_initial=0.1)
    model = f"crash-{unique}"
    upstream = f"http://127.0.0.1:{_free_port()}/v1"
    t0 = time.monotonic()
    await cluster.load(
        model, engine="openai", engine_options={"upstream_url": upstream, "upstream_api_key": "k"}
    )

    async def failed() -> Placement | None:
        p = await cluster.placement(model, 0)
        return p if p is not None and p.state is PlacementState.FAILED else None

    p = await wait_until(failed, 25, "the placement to fail")
    print(f"crash loop -> Failed in {time.monotonic() - t0:.2f}s; reason: {p.reason!r}")
    assert "not answering /models" in p.reason and upstream in p.reason
    assert "3 crashes in a row" in p.reason and "exited with code 1" in p.reason
    assert p.worker_id is None and p.node_id == "node-c"
    assert agent.stats.spawns == 3 and agent.stats.failed == 1
    # ...and it stays down: no more restarts.
    await asyncio.sleep(1.0)
    assert agent.workers == {} and agent.stats.spawns == 3
    still = await cluster.placement(model, 0)
    assert still is not None and still.state is PlacementState.FAILED
    # Unloading a failed model still cleans up its key.
    await cluster.unload(model)
    await wait_until(lambda: _absent(cluster, model), 10, "the failed placement to go")


async def _absent(cluster: Cluster, model: str) -> bool:
    return await cluster.placement(model, 0) is None


async def test_unsupported_engine_fails_at_once(cluster: Cluster, unique: str) -> None:
    await cluster.scheduler()
    agent = await cluster.agent("node-u")
    model = f"tf-{unique}"
    await cluster.load(model, engine="tensorflow")

    async def failed() -> Placement | None:
        p = await cluster.placement(model, 0)
        return p if p is not None and p.state is PlacementState.FAILED else None

    p = await wait_until(failed, 10, "the placement to fail")
    assert "engine 'tensorflow' is not supported" in p.reason
    assert agent.stats.spawns == 0


_AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    from pathlib import Path
    from nebula.settings import NatsSettings, NodeSettings
    from workers.node import NodeAgent

    async def main() -> None:
        settings = NodeSettings(
            node_id=sys.argv[2], log_dir=Path(sys.argv[3]), simulated_gpus="1x80GiB",
            heartbeat_interval=0.5,
        )
        async with NodeAgent(settings, NatsSettings(url=sys.argv[1])):
            print("agent up", flush=True)
            await asyncio.Event().wait()

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
    """
)


async def test_dead_node_replicas_move(cluster: Cluster, unique: str) -> None:
    """SIGKILL a node agent (its workers die with it): the replicas move and serve again."""
    await cluster.scheduler()
    log_file = cluster.tmp / "agent-x.log"
    with open(log_file, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _AGENT_SCRIPT,
            cluster.nats.url,
            "node-x",
            str(cluster.tmp / "logs" / "node-x"),
            stdout=out,
            stderr=out,
        )
    try:
        model = f"move-{unique}"
        await cluster.load(model, replicas=2, gpu_memory=0.25)
        ps = await cluster.wait_ready(model, 2)
        assert {p.node_id for p in ps} == {"node-x"}
        worker_pids = [int(p) for p in _children(proc.pid)]
        assert len(worker_pids) == 2
        survivor = await cluster.agent("node-y")
        gw = await cluster.fabric.gateway()
        client = await cluster.fabric.client(gw)
        assert await chat(client, model)

        t0 = time.monotonic()
        proc.kill()
        await proc.wait()
        await wait_until(lambda: not any(alive(p) for p in worker_pids), 10, "workers to die")
        t_dead = time.monotonic() - t0

        async def moved() -> bool:
            got = await cluster.replicas(model, 2)
            return all(p is not None and p.node_id == "node-y" and p.state is READY for p in got)

        await wait_until(moved, 20, "replicas Ready on node-y")
        t_ready = time.monotonic() - t0
        await serve_eventually(client, model)
        t_serve = time.monotonic() - t0
        print(
            f"node killed: workers gone after {t_dead:.2f}s, replicas Ready on the other node "
            f"after {t_ready:.2f}s, serving after {t_serve:.2f}s "
            "(scheduler node_ttl 1.5s + node_grace 1.0s, heartbeat 0.5s)"
        )
        assert len(survivor.workers) == 2
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


async def test_nats_restart_agent_rebuilds_its_view(tmp_path: Path, unique: str) -> None:
    """NATS dies and comes back: workers keep running, the agent watches again, and an
    unload issued afterwards still drains the worker and deletes the key."""
    port = _free_port()
    store = tmp_path / "nats"
    server = await fresh_nats(store, port=port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            ns = NatsSettings(url=server.url)
            nc = await natsio.connect(ns, name="test-node-restart")
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            models = await natsio.ensure_bucket(js, ns, subjects.MODELS_BUCKET)
            placements = await natsio.ensure_bucket(js, ns, subjects.PLACEMENTS_BUCKET)
            sched = SchedulerSettings(lease_ttl=1.0, node_ttl=3.0, node_grace=5.0)
            await stack.enter_async_context(Scheduler(nc, sched, nats_settings=ns))
            agent = await stack.enter_async_context(
                NodeAgent(
                    NodeSettings(
                        node_id="node-r", log_dir=tmp_path / "logs", heartbeat_interval=0.5
                    ),
                    ns,
                )
            )
            model = f"restart-{unique}"
            spec = ModelSpec(name=model, engine="sim")
            await models.put(subjects.model_key(model), msgspec.json.encode(spec))
            key = subjects.placement_key(model, 0)

            async def state() -> PlacementState | None:
                try:
                    entry = await placements.get(key)
                except KeyNotFoundError:
                    return None
                except Exception:
                    return None
                return msgspec.json.decode(entry.value or b"", type=Placement).state

            await wait_until(lambda: _is(state, READY), 20, "ready before the restart")
            (handle,) = agent.workers.values()
            resyncs = agent.stats.resyncs

            await server.kill()
            await asyncio.sleep(1.0)
            server = await fresh_nats(store, port=port)
            t0 = time.monotonic()
            await wait_until(lambda: agent.stats.resyncs > resyncs, 15, "the agent to resync")
            print(f"agent re-watching {time.monotonic() - t0:.2f}s after NATS came back")
            assert handle.running and agent.workers[key] is handle  # never restarted

            await models.delete(subjects.model_key(model))
            await wait_until(lambda: _is(state, None), 20, "the key to be deleted after unload")
            assert agent.workers == {} and not alive(handle.pid)
    finally:
        await server.close()


async def _is(state: Callable[[], Any], want: PlacementState | None) -> bool:
    return bool(await state() == want)


async def test_agent_restart_picks_up_its_placements(cluster: Cluster, unique: str) -> None:
    """A cleanly stopped agent leaves its placements (marked not ready); its successor with
    the same node id runs them again before the scheduler's grace period ends."""
    await cluster.scheduler(node_ttl=2.0, node_grace=20.0)
    model = f"again-{unique}"
    first = NodeAgent(cluster.node_settings("node-s"), cluster.nats)
    async with first:
        await cluster.load(model, replicas=2)
        before = await cluster.wait_ready(model, 2)
        pids = [h.pid for h in first.workers.values()]
    assert first.state == "closed" and first.workers == {}
    await first.close()  # twice is fine
    assert not any(alive(pid) for pid in pids)
    stopped = await cluster.replicas(model, 2)
    assert all(
        p is not None and p.state is PlacementState.STARTING and "stopped" in p.reason
        for p in stopped
    )
    with pytest.raises(KeyNotFoundError):
        await cluster.nodes_kv.get(subjects.node_key("node-s"))  # heartbeat deleted

    t0 = time.monotonic()
    second = await cluster.agent("node-s")
    after = await cluster.wait_ready(model, 2)
    print(f"restarted agent had its replicas Ready again in {time.monotonic() - t0:.2f}s")
    assert {p.node_id for p in after} == {"node-s"}
    assert {p.worker_id for p in after} == {h.worker_id for h in second.workers.values()}
    assert not {p.worker_id for p in after} & {p.worker_id for p in before}


def test_parse_labels() -> None:
    assert parse_labels("zone=a, gpu = h100,,empty=") == {"zone": "a", "gpu": "h100", "empty": ""}
    for bad in ("zone", "=a"):
        with pytest.raises(InvalidRequest):
            parse_labels(bad)
