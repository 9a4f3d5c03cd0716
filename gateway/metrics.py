"""The gateway's metrics: what each request did and where its time went.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``nebula_time_to_first_token_
seconds``, ``prompt_tokens_total``, ``generation_tokens_total``, ...) so dashboards for
one read the other. Every request ends exactly once in ``nebula_requests_total`` with
its final outcome: ``completed``, ``client_gone`` (the client left, a stream that was
abandoned included) or ``error`` with the status it got.

Per (model, endpoint) the numbers are plain Python ints, floats and bucket lists
(the event loop is their only writer: no locks), turned into Prometheus metric
families only when scraped; a request costs a dict lookup and a few additions and
bisects, nothing per token. Only loaded models get their own label value; anything
else is ``model="unknown"``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.registry import ModelRegistry
from nebula import natsio
from nebula.admin import ClusterAdmin
from nebula.metrics import ITL_BUCKETS, LATENCY_BUCKETS

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"
COMPLETED = "completed"
CLIENT_GONE = "client_gone"
ERROR = "error"


class _Hist:
    """A histogram as plain numbers: the event loop is the only writer, so no locks;
    exported by :class:`_RequestCollector` at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((floatToGoString(bound), float(total)))
        return out


class _Bound:
    """One (model, endpoint)'s numbers."""

    __slots__ = ("e2e", "endpoint", "in_flight", "itl", "model", "outcomes", "prompt", "queue",
                 "tokens", "ttft")  # fmt: skip

    def __init__(self, model: str, endpoint: str) -> None:
        self.model = model
        self.endpoint = endpoint
        self.ttft = _Hist(LATENCY_BUCKETS)
        self.e2e = _Hist(LATENCY_BUCKETS)
        self.itl = _Hist(ITL_BUCKETS)
        self.queue = _Hist(LATENCY_BUCKETS)
        self.prompt = 0
        self.tokens = 0
        self.in_flight = 0
        self.outcomes: dict[tuple[str, int], int] = {}

    def outcome(self, outcome: str, status: int) -> None:
        key = (outcome, status)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


class _RequestCollector(Collector):
    """The request metrics, built from the plain numbers when Prometheus scrapes."""

    def __init__(self, m: GatewayMetrics) -> None:
        self.m = m

    def collect(self) -> Iterable[Metric]:
        me, mm = ["model", "endpoint"], ["model"]
        requests = CounterMetricFamily(
            "nebula_requests",
            "Requests by model, endpoint and final outcome (completed, client_gone, error) "
            "with the HTTP status (or the status of a stream's error event).",
            labels=["model", "endpoint", "outcome", "status"],
        )
        ttft = HistogramMetricFamily(
            "nebula_time_to_first_token_seconds",
            "Streamed requests: arrival at the gateway to the first token frame.",
            labels=me,
        )
        e2e = HistogramMetricFamily(
            "nebula_e2e_request_latency_seconds",
            "Completed requests: arrival at the gateway to the last byte of the answer.",
            labels=me,
        )
        itl = HistogramMetricFamily(
            "nebula_inter_token_latency_seconds",
            "Streamed requests: mean time between output tokens after the first, one "
            "observation per request.",
            labels=mm,
        )
        queue = HistogramMetricFamily(
            "nebula_request_queue_time_seconds",
            "Time a job waited in the model's queue until a worker started it.",
            labels=mm,
        )
        prompt = CounterMetricFamily(
            "nebula_prompt_tokens", "Prompt (input) tokens of completed requests.", labels=mm
        )
        gen = CounterMetricFamily(
            "nebula_generation_tokens", "Generated (output) tokens of completed requests.",
            labels=mm,
        )  # fmt: skip
        in_flight = GaugeMetricFamily(
            "nebula_requests_in_flight",
            "Requests this gateway holds open (queued or running).",
            labels=mm,
        )
        published = CounterMetricFamily(
            "nebula_jobs_published",
            "Jobs this gateway queued (a transparent retry or a re-queue after a NATS "
            "restart counts again).",
            labels=mm,
        )
        requeued = CounterMetricFamily(
            "nebula_jobs_requeued",
            "Jobs queued again: a silent worker's (retry) or lost with a NATS restart.",
            labels=mm,
        )
        per_model: dict[str, list[_Bound]] = {}
        for (model, endpoint), b in list(self.m._bound.items()):
            for (outcome, status), n in list(b.outcomes.items()):
                requests.add_metric([model, endpoint, outcome, str(status)], n)
            if model == UNKNOWN_MODEL:
                continue  # only its request count: nothing else is known about it
            per_model.setdefault(model, []).append(b)
            ttft.add_metric([model, endpoint], b.ttft.buckets(), b.ttft.sum)
            e2e.add_metric([model, endpoint], b.e2e.buckets(), b.e2e.sum)
        for model, bs in per_model.items():
            merged_itl, merged_queue = _merge([b.itl for b in bs]), _merge([b.queue for b in bs])
            itl.add_metric([model], merged_itl.buckets(), merged_itl.sum)
            queue.add_metric([model], merged_queue.buckets(), merged_queue.sum)
            prompt.add_metric([model], sum(b.prompt for b in bs))
            gen.add_metric([model], sum(b.tokens for b in bs))
            in_flight.add_metric([model], sum(b.in_flight for b in bs))
        for model, n in list(self.m.published.items()):
            published.add_metric([model], n)
        for model, n in list(self.m.requeued.items()):
            requeued.add_metric([model], n)
        return [requests, ttft, e2e, itl, queue, prompt, gen, in_flight, published, requeued]


def _merge(hists: list[_Hist]) -> _Hist:
    out = _Hist(hists[0].bounds)
    for h in hists:
        out.counts = [a + b for a, b in zip(out.counts, h.counts, strict=True)]
        out.sum += h.sum
    return out


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, *, enabled: bool = True) -> None:
        self.registry = registry
        self.enabled = enabled  # False: requests are not recorded (benchmarks only)
        self._bound: dict[tuple[str, str], _Bound] = {}
        self.published: dict[str, int] = {}
        self.requeued: dict[str, int] = {}
        registry.register(_RequestCollector(self))
        self.queue_depth = Gauge(
            "nebula_queue_depth",
            "Jobs waiting in the model's queue (interactive: its request stream; batch: "
            "batch-job items), as JetStream reports it.",
            ["model", "priority"],
            registry=registry,
        )
        self.queue_limit = Gauge(
            "nebula_queue_limit", "Jobs the model's interactive queue holds at most.", ["model"],
            registry=registry,
        )  # fmt: skip
        self.dead_letters = Gauge(
            "nebula_dead_letters",
            "Jobs parked on the model's dead-letter subject.",
            ["model"],
            registry=registry,
        )
        self.ready_replicas = Gauge(
            "nebula_model_ready_replicas",
            "Workers ready to take jobs, per model.",
            ["model"],
            registry=registry,
        )
        self.gauge_models: set[str] = set()  # models the queue gauges have series for

    def bound(self, model: str, endpoint: str) -> _Bound:
        b = self._bound.get((model, endpoint))
        if b is None:
            b = self._bound[(model, endpoint)] = _Bound(model, endpoint)
        return b

    def count_published(self, model: str) -> None:
        if self.enabled:
            self.published[model] = self.published.get(model, 0) + 1

    def count_requeued(self, model: str) -> None:
        if self.enabled:
            self.requeued[model] = self.requeued.get(model, 0) + 1


class NullTracker:
    """A Tracker that records nothing (``--no-request-metrics``, to measure their cost)."""

    b: _Bound | None = None

    def __init__(self, m: GatewayMetrics, endpoint: str) -> None:
        pass

    def bind(self, model: str) -> None:
        self.b = _NULL_BOUND

    def started(self, queued: float) -> None:
        pass

    def first_token(self) -> None:
        pass

    def finish(self, outcome: str, status: int, usage: str | None = None) -> None:
        pass


class Tracker:
    """One request's accounting, from arrival to its final outcome (recorded once)."""

    __slots__ = ("b", "done", "endpoint", "first_at", "m", "start")

    def __init__(self, m: GatewayMetrics, endpoint: str) -> None:
        self.m = m
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self.b: _Bound | None = None
        self.first_at = 0.0
        self.done = False

    def bind(self, model: str) -> None:
        """The model is loaded: from here on the request counts under its name."""
        self.b = self.m.bound(model, self.endpoint)
        self.b.in_flight += 1

    def started(self, queued: float) -> None:
        if self.b is not None and queued >= 0:
            self.b.queue.observe(queued)

    def first_token(self) -> None:
        self.first_at = time.perf_counter()
        if self.b is not None:
            self.b.ttft.observe(self.first_at - self.start)

    def finish(self, outcome: str, status: int, usage: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        b = self.b
        if b is None:
            self.m.bound(UNKNOWN_MODEL, self.endpoint).outcome(outcome, status)
            return
        b.in_flight -= 1
        b.outcome(outcome, status)
        if outcome != COMPLETED:
            return
        now = time.perf_counter()
        b.e2e.observe(now - self.start)
        if usage:
            prompt, _, completion = usage.partition(" ")
            if prompt.isdigit():
                b.prompt += int(prompt)
            if completion.isdigit():
                n = int(completion)
                b.tokens += n
                if self.first_at and n > 1:
                    b.itl.observe((now - self.first_at) / (n - 1))


_NULL_BOUND: Any = object()


def tracker(m: GatewayMetrics, endpoint: str) -> Tracker | NullTracker:
    return Tracker(m, endpoint) if m.enabled else NullTracker(m, endpoint)


async def refresh_queue_gauges(
    m: GatewayMetrics, admin: ClusterAdmin, models: ModelRegistry
) -> None:
    """Queue depth, bound, dead letters and ready replicas of every desired model, from
    JetStream (every gateway sees the same numbers: aggregate them with max, not sum)."""
    specs = models.desired()
    names = sorted(specs)
    depths = await admin.queue_depths(names)
    batch = await admin.batch_depths()
    dead = await admin.dead_letter_counts()
    for name in names:
        m.queue_depth.labels(name, "interactive").set(depths.get(name, 0))
        m.queue_depth.labels(name, "batch").set(batch.get(name, 0))
        m.queue_limit.labels(name).set(specs[name].max_queue)
        m.dead_letters.labels(name).set(dead.get(name, 0))
        m.ready_replicas.labels(name).set(len(models.live_workers(name)))
    gone = m.gauge_models - set(names)
    for name in gone:  # unloaded: its series go, so label values stay the loaded models
        for priority in ("interactive", "batch"):
            m.queue_depth.remove(name, priority)
        for g in (m.queue_limit, m.dead_letters, m.ready_replicas):
            g.remove(name)
    m.gauge_models = set(names)


async def poll_queue_gauges(
    m: GatewayMetrics, admin: ClusterAdmin, models: ModelRegistry, interval: float
) -> None:
    while True:
        try:
            await refresh_queue_gauges(m, admin, models)
        except Exception as e:  # NATS away: keep the last values, try again
            log.debug("queue gauges not refreshed: %s", e)
        natsio.raise_if_cancelled()
        await asyncio.sleep(interval)
