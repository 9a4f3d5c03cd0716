"""Pieces of Prometheus exposition every Nebula process shares.

Each process builds its own ``CollectorRegistry`` and passes it in (never the global
default registry). Processes without an HTTP API of their own (node agent, scheduler)
serve ``/metrics`` from :class:`MetricsServer`, a tiny asyncio HTTP responder on the
process's own loop: no thread, and scrapes read state without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from nats.aio.client import Client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.service import Service

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets (seconds) shared by the request histograms: vLLM's TTFT buckets,
# a few finer ones at the bottom for the simulated engine and the fabric's own cost.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


class NatsCollector(Collector):
    """``nebula_nats_connected`` and ``nebula_nats_reconnects_total`` of one connection,
    read at scrape time from the client itself. ``connection`` returns None until the
    process has connected."""

    def __init__(self, component: str, connection: Callable[[], Client | None]) -> None:
        self.component = component
        self.connection = connection

    def collect(self) -> Iterable[Metric]:
        nc = self.connection()
        up = GaugeMetricFamily(
            "nebula_nats_connected",
            "1 while this process's NATS connection is up.",
            labels=["component"],
        )
        rec = CounterMetricFamily(
            "nebula_nats_reconnects",
            "Times this process's NATS connection was re-established.",
            labels=["component"],
        )
        up.add_metric([self.component], 1.0 if nc is not None and nc.is_connected else 0.0)
        rec.add_metric([self.component], float(nc.stats.get("reconnects", 0) if nc else 0))
        return [up, rec]


class MetricsServer(Service):
    """``GET /metrics`` (anything else: 404) on ``host:port``; port 0 picks a free one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method == b"GET" and path == b"/metrics":
                body, status, ctype = generate_latest(self.registry), b"200 OK", CONTENT_TYPE
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", "text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int | None, what: str
) -> MetricsServer | None:
    """Start a MetricsServer, or None when ``port`` is None (disabled). A port already in
    use is one warning, not a failure: serving inference matters more than its metrics."""
    if port is None:
        return None
    server = MetricsServer(registry, host, port)
    try:
        await server.start()
    except OSError as e:
        log.warning("%s: cannot serve /metrics on %s:%s (%s); metrics are off", what, host, port, e)
        return None
    log.info("%s: metrics on %s", what, server.url)
    return server
