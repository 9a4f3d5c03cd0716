"""`nebula cluster status`: the cluster from JetStream (nodes, GPUs, models, replicas,
queues) joined with what the gateways' ``/metrics`` say about traffic (request rates,
TTFT quantiles), as JSON, as text, or as a live terminal view (rich).

Rates and quantiles come from the difference between two scrapes (the refresh
interval), as Prometheus' ``rate`` and ``histogram_quantile`` would compute them; a
single scrape (``--json`` without ``--watch``) gives totals since the gateway started.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from nebula.admin import ModelStatus, NodeStatus


@dataclass
class ModelTraffic:
    requests: float = 0.0
    errors: float = 0.0
    in_flight: float = 0.0
    ttft: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


@dataclass
class GatewayScrape:
    url: str
    at: float
    up: bool
    error: str = ""
    models: dict[str, ModelTraffic] = field(default_factory=dict)


async def scrape(client: httpx.AsyncClient, url: str) -> GatewayScrape:
    at = time.monotonic()
    try:
        r = await client.get(url.rstrip("/") + "/metrics")
        r.raise_for_status()
    except httpx.HTTPError as e:
        return GatewayScrape(url, at, False, error=str(e) or type(e).__name__)
    out = GatewayScrape(url, at, True)
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None or model == "unknown":
                continue
            t = out.models.setdefault(model, ModelTraffic())
            if s.name == "nebula_requests_total":
                t.requests += s.value
                if s.labels.get("outcome") == "error":
                    t.errors += s.value
            elif s.name == "nebula_requests_in_flight":
                t.in_flight += s.value
            elif s.name == "nebula_time_to_first_token_seconds_bucket":
                le = float(s.labels["le"])
                t.ttft[le] = t.ttft.get(le, 0.0) + s.value
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts (linear within a bucket)."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


class ModelRates(msgspec.Struct, kw_only=True):
    requests: float
    errors: float
    in_flight: float
    rate: float | None = None  # requests/s over the last interval (None: one scrape)
    ttft_p50: float | None = None
    ttft_p99: float | None = None


class GatewayStatus(msgspec.Struct, kw_only=True):
    url: str
    up: bool
    error: str = ""
    models: dict[str, ModelRates] = {}


def combine(cur: GatewayScrape, prev: GatewayScrape | None) -> GatewayStatus:
    if not cur.up:
        return GatewayStatus(url=cur.url, up=False, error=cur.error)
    usable = prev if prev is not None and prev.up else None
    models = {}
    for name, t in sorted(cur.models.items()):
        p = usable.models.get(name) if usable else None
        if usable is not None:
            dt = max(cur.at - usable.at, 1e-6)
            before = p or ModelTraffic()
            rate: float | None = max(0.0, t.requests - before.requests) / dt
            ttft = {le: c - before.ttft.get(le, 0.0) for le, c in t.ttft.items()}
        else:
            rate, ttft = None, t.ttft
        models[name] = ModelRates(
            requests=t.requests,
            errors=t.errors,
            in_flight=t.in_flight,
            rate=rate,
            ttft_p50=quantile(0.5, ttft),
            ttft_p99=quantile(0.99, ttft),
        )
    return GatewayStatus(url=cur.url, up=True, models=models)


class ClusterStatus(msgspec.Struct, kw_only=True):
    nodes: list[NodeStatus]
    models: list[ModelStatus]
    gateways: list[GatewayStatus]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}G"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}ms" if v >= 0.01 else f"{v * 1000:.1f}ms"


def traffic_by_model(status: ClusterStatus) -> dict[str, ModelRates]:
    """Per model over every gateway: rates add up; quantiles take the worst gateway."""
    out: dict[str, ModelRates] = {}
    for g in status.gateways:
        for name, r in g.models.items():
            o = out.get(name)
            if o is None:
                out[name] = msgspec.structs.replace(r)
                continue
            out[name] = ModelRates(
                requests=o.requests + r.requests,
                errors=o.errors + r.errors,
                in_flight=o.in_flight + r.in_flight,
                rate=None if o.rate is None or r.rate is None else o.rate + r.rate,
                ttft_p50=_worst(o.ttft_p50, r.ttft_p50),
                ttft_p99=_worst(o.ttft_p99, r.ttft_p99),
            )
    return out


def _worst(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def render(status: ClusterStatus) -> Any:
    """A rich renderable: nodes and GPUs, models with replicas, queues and traffic."""
    from rich.console import Group
    from rich.table import Table

    nodes = Table(title=f"Nodes ({len(status.nodes)})", title_justify="left", expand=True)
    for col in ("node", "heartbeat", "GPUs used/total (allocated)", "CPUs", "memory free",
                "placements"):  # fmt: skip
        nodes.add_column(col)
    for n in status.nodes:
        gpus = "\n".join(
            f"gpu{g.index} {g.name} {_gib(g.memory_total - g.memory_free)}/"
            f"{_gib(g.memory_total)} ({n.gpu_allocated.get(g.index, 0):.2f})"
            + (f" util {g.utilization:.0%}" if g.utilization >= 0 else "")
            for g in n.info.gpus
        )
        age = n.heartbeat_age
        nodes.add_row(
            n.node_id,
            f"[{'red' if age > 6 else 'green'}]{age:.1f}s[/]",
            gpus or "cpu only",
            str(n.info.cpu_count),
            f"{_gib(n.info.memory_free)}/{_gib(n.info.memory_total)}",
            "\n".join(n.placements) or "-",
        )
    traffic = traffic_by_model(status)
    models = Table(title=f"Models ({len(status.models)})", title_justify="left", expand=True)
    for col in ("model", "engine", "ready", "state", "queued", "batch", "dead", "req/s",
                "in flight", "errors", "TTFT p50", "TTFT p99"):  # fmt: skip
        models.add_column(col, justify="left" if col in ("model", "engine", "state") else "right")
    colours = {"Ready": "green", "Pending": "yellow", "Starting": "yellow", "Failed": "red"}
    for m in status.models:
        t = traffic.get(m.name)
        state = f"[{colours.get(m.state, 'white')}]{m.state}[/]" + (
            f" {m.reason}" if m.reason else ""
        )
        models.add_row(
            m.name,
            m.engine,
            f"{m.ready}/{m.replicas}",
            state,
            f"{m.queued}/{m.max_queue}",
            str(m.batch_queued),
            str(m.dead_letters),
            "-" if t is None or t.rate is None else f"{t.rate:.1f}",
            "-" if t is None else f"{t.in_flight:.0f}",
            "-" if t is None else f"{t.errors:.0f}",
            _ms(t.ttft_p50) if t else "-",
            _ms(t.ttft_p99) if t else "-",
        )
    gateways = "  ".join(
        f"{g.url} [green]up[/]" if g.up else f"{g.url} [red]down[/] ({g.error})"
        for g in status.gateways
    )
    return Group(nodes, models, f"gateways: {gateways or '-'}   ({time.strftime('%H:%M:%S')})")
