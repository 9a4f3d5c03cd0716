"""Observability: metrics that move with traffic and tell the truth, one request id
across processes, structured logs read back merged, `cluster status --json`, and a
Grafana dashboard that queries only exported metrics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nebula import logs
from nebula.admin import LoadRequest
from nebula.metrics import MetricsServer
from nebula.protocol import PlacementState
from tests.conftest import Fabric, until
from tests.test_node import Cluster, cluster  # noqa: F401  (the fixture)

MSG = [{"role": "user", "content": "hello metrics"}]
ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def scrape(http: httpx.AsyncClient, url: str) -> Samples:
    r = await http.get(url)
    assert r.status_code == 200, r.text
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def _stream_and_abandon(http: httpx.AsyncClient, model: str) -> None:
    """Read the first token of a long stream, then hang up."""
    body = {"model": model, "messages": MSG, "stream": True, "max_tokens": 400}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                break


async def test_request_metrics_move_with_traffic(fabric: Fabric, unique: str) -> None:
    model = f"obs-{unique}"
    gw = await fabric.gateway(dispatch_timeout=20)
    assert gw.gateway is not None and gw.gateway.admin is not None
    await gw.gateway.admin.load(LoadRequest(name=model, engine="sim", max_queue=1))
    # The worker allows fewer output tokens than the model spec: its 400 is a failure
    # reported by the worker, after the job started.
    worker = await fabric.worker(
        model, max_concurrency=1, itl_ms=20, max_tokens=1000, worker={"max_output_tokens": 500}
    )
    http = await fabric.stack.enter_async_context(httpx.AsyncClient(base_url=gw.base_url))
    client = await fabric.client(gw)
    before = await scrape(http, "/metrics")

    # Completed: two streams (with usage) and one unary answer.
    for _ in range(2):
        stream = await client.chat.completions.create(
            model=model,
            messages=MSG,  # type: ignore[arg-type]
            stream=True,
            max_tokens=5,
            stream_options={"include_usage": True},
        )
        async for _chunk in stream:
            pass
    r = await client.chat.completions.create(model=model, messages=MSG, max_tokens=3)  # type: ignore[arg-type]
    assert r.usage is not None
    # Failed: the worker refuses max_tokens over its limit.
    bad = {"model": model, "messages": MSG, "stream": True, "max_tokens": 501}
    assert (await http.post("/v1/chat/completions", json=bad)).status_code == 400
    # Abandoned mid-stream: the client reads one token and leaves.
    await _stream_and_abandon(http, model)
    await until(lambda: worker.inflight == 0)

    # 429: one stream runs (A), one job waits (B, unary), the next is refused.
    body_a = {"model": model, "messages": MSG, "stream": True, "max_tokens": 400}
    async with http.stream("POST", "/v1/chat/completions", json=body_a) as ra:
        # Keep the iterator referenced: a finalized one closes the connection.
        lines_a = ra.aiter_lines()
        async for line in lines_a:
            if line.startswith("data: {"):
                break
        waiting = asyncio.create_task(
            http.post(
                "/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 2}
            )
        )
        await until(
            lambda: (
                gw.gateway is not None
                and len(gw.gateway.dispatcher.calls) == 2
                and all(c.seq for c in gw.gateway.dispatcher.calls.values())
            )
        )
        full = await http.post("/v1/chat/completions", json={"model": model, "messages": MSG})
        assert full.status_code == 429
        del lines_a
    assert (await waiting).status_code == 200  # A left (a second client_gone), B ran

    async def settled() -> bool:
        now = await scrape(http, "/metrics")
        return value(now, "nebula_requests_in_flight", model=model) == 0 and (
            delta(before, now, "nebula_requests_total", model=model) == 8
        )

    await until(settled)
    after = await scrape(http, "/metrics")

    def requests(outcome: str, status: str) -> float:
        return delta(
            before, after, "nebula_requests_total",
            model=model, endpoint="chat", outcome=outcome, status=status,
        )  # fmt: skip

    assert requests("completed", "200") == 4  # two streams, two unary (one was B)
    assert requests("client_gone", "200") == 2  # abandoned mid-stream: NOT completed
    assert requests("error", "400") == 1
    assert requests("error", "429") == 1
    # TTFT: every streamed request that got a token (two completed, two abandoned).
    assert delta(before, after, "nebula_time_to_first_token_seconds_count", model=model) == 4
    assert delta(before, after, "nebula_e2e_request_latency_seconds_count", model=model) == 4
    # ITL: completed streams with more than one token.
    assert delta(before, after, "nebula_inter_token_latency_seconds_count", model=model) == 2
    # Every job a worker started waited in the queue first (the 429 was never queued).
    assert delta(before, after, "nebula_request_queue_time_seconds_count", model=model) == 7
    assert delta(before, after, "nebula_jobs_published_total", model=model) == 7
    assert delta(before, after, "nebula_generation_tokens_total", model=model) == 5 + 5 + 3 + 2
    assert delta(before, after, "nebula_prompt_tokens_total", model=model) > 0
    assert value(after, "nebula_nats_connected", component="gateway") == 1

    # Queue gauges come from JetStream: the model's bound is exported, depth is back to 0.
    async def gauges() -> bool:
        now = await scrape(http, "/metrics")
        return value(now, "nebula_queue_limit", model=model) == 1 and (
            ("nebula_queue_depth", frozenset({("model", model), ("priority", "interactive")}))
            in now
        )

    await until(gauges)
    # Unknown models never become label values.
    await http.post("/v1/chat/completions", json={"model": f"nope-{unique}", "messages": MSG})
    text = (await http.get("/metrics")).text
    assert f"nope-{unique}" not in text
    assert 'model="unknown"' in text
    await gw.gateway.admin.unload(model)


async def test_request_id_round_trip(fabric: Fabric, unique: str) -> None:
    model = f"rid-{unique}"
    gw = await fabric.gateway()
    await fabric.worker(model)
    http = await fabric.stack.enter_async_context(httpx.AsyncClient(base_url=gw.base_url))
    body = {"model": model, "messages": MSG, "max_tokens": 2}
    r = await http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    r = await http.post("/v1/chat/completions", json={**body, "stream": True})
    generated = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # Unsafe ids (not a NATS token) are replaced, errors carry the id too.
    r = await http.post(
        "/v1/chat/completions", json={"model": "x"}, headers={"X-Request-Id": "a b.c"}
    )
    assert r.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


async def test_node_scheduler_metrics_request_id_in_worker_log(
    cluster: Cluster,  # noqa: F811
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Worker processes inherit these: JSON logs with per-request lines.
    monkeypatch.setenv("NEBULA_LOG_FORMAT", "json")
    monkeypatch.setenv("NEBULA_LOG_LEVEL", "warning,workers.worker=info")
    model = f"node-obs-{unique}"
    sched = await cluster.scheduler()
    agent = await cluster.agent("n1")
    node_metrics = await cluster.stack.enter_async_context(
        MetricsServer(agent.registry, "127.0.0.1", 0)
    )
    sched_metrics = await cluster.stack.enter_async_context(
        MetricsServer(sched.registry, "127.0.0.1", 0)
    )
    await cluster.load(model, max_concurrency=3)
    await cluster.wait_ready(model, 1)
    gw = await cluster.fabric.gateway()
    http = await cluster.stack.enter_async_context(httpx.AsyncClient(base_url=gw.base_url))
    await until(lambda: model in gw.gateway.models.ready_models() if gw.gateway else False)

    rid = f"trace-{unique}"
    body = {"model": model, "messages": MSG, "max_tokens": 3, "stream": True}
    r = await http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid

    # The worker (another process) logged a JSON line about that request, with its id.
    def worker_lines() -> list[dict[str, object]]:
        found = []
        for path in (cluster.tmp / "logs" / "n1").glob("*.log"):
            for line in path.read_text().splitlines():
                if line.startswith("{") and rid in line:
                    found.append(json.loads(line))
        return found

    await until(lambda: bool(worker_lines()))
    line = worker_lines()[0]
    assert line["request_id"] == rid and line["component"] == "worker"
    assert "completed" in str(line["msg"])

    # `nebula logs --request-id` finds it among everything under the log folder.
    merged, _ = logs.merged(cluster.tmp / "logs", request_id=rid)
    assert merged and all(rid in ln.text for ln in merged)

    # Node metrics: slots, job counters (from worker heartbeats), simulated GPU.
    async def node_counts() -> bool:
        s = await scrape(http, node_metrics.url)
        return value(s, "nebula_worker_jobs_total", model=model, outcome="completed") == 1

    await until(node_counts)
    s = await scrape(http, node_metrics.url)
    assert value(s, "nebula_worker_slots", node="n1", model=model, state="free") == 3
    assert value(s, "nebula_worker_slots", model=model, state="busy") == 0
    assert value(s, "nebula_workers", model=model, state="ready") == 1
    assert value(s, "nebula_gpu_memory_total_bytes", node="n1", gpu="0") == 80 * 2**30
    assert value(s, "nebula_nats_connected", component="node") == 1
    assert ("nebula_engine_kv_cache_usage_ratio", frozenset(
        {("node", "n1"), ("model", model)})) in s  # fmt: skip

    # Scheduler metrics: leadership, placements by state, reconcile passes.
    s = await scrape(http, sched_metrics.url)
    assert value(s, "nebula_scheduler_leader") == 1
    assert value(s, "nebula_placements", state=PlacementState.READY.value) == 1
    assert value(s, "nebula_scheduler_reconcile_duration_seconds_count") >= 1

    # `cluster status --json` matches the cluster as the admin API reads it.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "cluster", "status", "--json",
        "--nats-url", cluster.nats.url, "--gateway-url", gw.base_url,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    status = json.loads(stdout)
    assert [n["node_id"] for n in status["nodes"]] == ["n1"]
    (node,) = status["nodes"]
    assert node["info"]["gpus"][0]["memory_total"] == 80 * 2**30
    assert any(p.startswith(f"{model}#0 Ready") for p in node["placements"]), node
    (m,) = [m for m in status["models"] if m["name"] == model]
    assert (m["ready"], m["replicas"], m["state"], m["queued"]) == (1, 1, "Ready", 0)
    (gateway,) = status["gateways"]
    assert gateway["up"] and gateway["models"][model]["requests"] >= 1


# --- logs -----------------------------------------------------------------------------


def test_log_lines_merge_in_time_order(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    (root / "workers").mkdir(parents=True)
    (root / "gateway.log").write_text(
        "2026-11-24T10:00:00.100Z INFO    gateway gateway.app [req=r1] first\n"
        "2026-11-24T10:00:00.300Z INFO    gateway gateway.app third\n"
    )
    (root / "workers" / "m.0.log").write_text(
        '{"ts": "2026-11-24T10:00:00.200Z", "level": "info", "component": "worker", '
        '"msg": "second", "request_id": "r1"}\n'
        "Traceback (most recent call last): stays with the line before\n"
    )
    lines, offsets = logs.merged(root)
    assert [ln.component for ln in lines] == ["gateway", "worker:m.0", "worker:m.0", "gateway"]
    assert "Traceback" in lines[2].text
    only = logs.merged(root, request_id="r1")[0]
    assert [ln.component for ln in only] == ["gateway", "worker:m.0"]
    assert [ln.text for ln in logs.merged(root, component="gateway")[0]][-1].endswith("third")
    with open(root / "gateway.log", "a") as f:
        f.write("2026-11-24T10:00:01.000Z WARNING gateway gateway.app fourth\n")
    assert [ln.text[-7:] for ln in logs.follow(root, offsets)] == [" fourth"]
    assert list(logs.follow(root, offsets)) == []


def test_json_log_format_carries_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    logs.configure(component="gateway", level="info", fmt="json")
    try:
        token = logs.REQUEST_ID.set("rid-42")
        logging.getLogger("gateway.test").info("hello %s", "there", extra={"model": "m"})
        logs.REQUEST_ID.reset(token)
        logging.getLogger("gateway.test").debug("not shown")
        # An engine's own handler (vLLM's format) still gets process and caller.
        record = logging.getLogger("vllm.x").makeRecord("vllm.x", 20, "f.py", 7, "m", (), None)
        vllm_like = logging.Formatter("(pid=%(process)d) [%(filename)s:%(lineno)d] %(message)s")
        assert vllm_like.format(record) == f"(pid={os.getpid()}) [f.py:7] m"
    finally:  # give the root logger back as pytest set it up
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    (line,) = capsys.readouterr().err.splitlines()
    obj = json.loads(line)
    assert obj["request_id"] == "rid-42" and obj["msg"] == "hello there"
    assert obj["component"] == "gateway" and obj["model"] == "m" and obj["level"] == "info"
    assert logs.parse_levels("warning,gateway=debug") == (30, {"gateway": 10})
    with pytest.raises(ValueError):
        logs.parse_levels("loud")


# --- dashboard ------------------------------------------------------------------------


def _queried_metrics(dashboard: dict[str, object]) -> set[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    assert exprs, "the dashboard queries nothing"
    return {m for e in exprs for m in re.findall(r"\bnebula_[a-z0-9_]+", e)}


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_queries_only_exported_metrics() -> None:
    """Every metric the dashboard queries is declared by some Nebula process."""
    from prometheus_client import CollectorRegistry

    from gateway.metrics import GatewayMetrics
    from nebula.metrics import NatsCollector
    from nebula.protocol import GpuInfo, NodeInfo, WorkerInfo
    from workers.metrics import NodeCollector, NodeView

    path = ROOT / "compose" / "grafana" / "nebula-dashboard.json"
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] and dashboard["panels"]

    reg = CollectorRegistry()
    m = GatewayMetrics(reg)
    m.bound("m", "chat").outcome("completed", 200)
    m.count_published("m")
    m.count_requeued("m")
    reg.register(NatsCollector("gateway", lambda: None))
    info = NodeInfo(node_id="n", gpus=[GpuInfo(index=0, memory_total=1, utilization=0.5)])
    worker = WorkerInfo(worker_id="w", model="m", engine="sim")
    reg.register(NodeCollector(NodeView("n", lambda: info, lambda: [worker])))
    names = {s.name for fam in reg.collect() for s in fam.samples}
    names |= {fam.name for fam in reg.collect()}
    # The scheduler's, from its module (it needs a connection to build).
    sched_src = (ROOT / "nebula" / "scheduler.py").read_text()
    names |= set(re.findall(r'"(nebula_[a-z_]+)"', sched_src))
    exported = {_base(n) for n in names}
    missing = {q for q in _queried_metrics(dashboard) if _base(q) not in exported}
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
    msgspec.json.decode(path.read_bytes())  # strict JSON too


# --- status view ----------------------------------------------------------------------


def test_status_view_rates_quantiles_and_render() -> None:
    from rich.console import Console

    from nebula import status as st
    from nebula.admin import ModelStatus, NodeStatus
    from nebula.protocol import GpuInfo, NodeInfo

    assert st.quantile(0.5, {0.01: 0, 0.02: 10, 0.04: 20, float("inf"): 20}) == 0.02
    assert st.quantile(0.99, {0.01: 0, 0.02: 10, 0.04: 20, float("inf"): 20}) == pytest.approx(
        0.0396
    )
    assert st.quantile(0.5, {}) is None
    before = st.GatewayScrape("g", 10.0, True, models={"m": st.ModelTraffic(requests=100)})
    after = st.GatewayScrape(
        "g", 12.0, True,
        models={"m": st.ModelTraffic(requests=140, errors=2, ttft={0.02: 40, float("inf"): 40})},
    )  # fmt: skip
    g = st.combine(after, before)
    assert g.models["m"].rate == 20.0 and g.models["m"].ttft_p50 == pytest.approx(0.01)
    assert st.combine(after, None).models["m"].rate is None  # one scrape: no rate
    node = NodeStatus(
        node_id="n1",
        heartbeat_age=0.4,
        info=NodeInfo(
            node_id="n1",
            gpus=[
                GpuInfo(
                    index=0,
                    name="H100",
                    memory_total=80 << 30,
                    memory_free=60 << 30,
                    utilization=0.5,
                )
            ],
        ),
        placements=["m#0 Ready"],
        gpu_allocated={0: 0.25},
    )
    model = ModelStatus(
        name="m", engine="sim", replicas=1, ready=1, state="Ready", max_queue=256, queued=3
    )
    report = st.ClusterStatus(nodes=[node], models=[model], gateways=[g])
    console = Console(record=True, width=200)
    console.print(st.render(report))
    text = console.export_text()
    for want in ("n1", "H100", "20.0G/80.0G", "util 50%", "m#0 Ready", "3/256", "20.0", "10ms"):
        assert want in text, want
    down = st.combine(st.GatewayScrape("g2", 0.0, False, error="refused"), None)
    assert down.up is False and msgspec.json.decode(msgspec.json.encode(down))["error"]
