"""The gateway's metrics: what each request did and where its time went.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``nebula_time_to_first_token_
seconds``, ``prompt_tokens_total``, ``generation_tokens_total``, ...) so dashboards for
one read the other. Every request ends exactly once in ``nebula_requests_total`` with
its final outcome: ``completed``, ``client_gone`` (the client left, a stream that was
abandoned included) or ``error`` with the status it got.

Label children are bound once per (model, endpoint), so the hot path does a dict
lookup and a few ``inc``/``observe`` calls per request, nothing per token. Only
loaded models get their own label value; anything else is ``model="unknown"``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.registry import ModelRegistry
from nebula.admin import ClusterAdmin
from nebula.metrics import ITL_BUCKETS, LATENCY_BUCKETS

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"
COMPLETED = "completed"
CLIENT_GONE = "client_gone"
ERROR = "error"


class _Bound:
    """One (model, endpoint)'s label children."""

    __slots__ = (
        "_outcomes",
        "e2e",
        "endpoint",
        "gen",
        "in_flight",
        "itl",
        "m",
        "model",
        "prompt",
        "queue",
        "ttft",
    )  # fmt: skip

    def __init__(self, m: GatewayMetrics, model: str, endpoint: str) -> None:
        self.m = m
        self.model = model
        self.endpoint = endpoint
        self.ttft = m.ttft.labels(model, endpoint)
        self.e2e = m.e2e.labels(model, endpoint)
        self.itl = m.itl.labels(model)
        self.queue = m.queue_time.labels(model)
        self.prompt = m.prompt_tokens.labels(model)
        self.gen = m.generation_tokens.labels(model)
        self.in_flight = m.in_flight.labels(model)
        self._outcomes: dict[tuple[str, int], Any] = {}

    def outcome(self, outcome: str, status: int) -> Any:
        child = self._outcomes.get((outcome, status))
        if child is None:
            child = self.m.requests.labels(self.model, self.endpoint, outcome, str(status))
            self._outcomes[(outcome, status)] = child
        return child


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, *, enabled: bool = True) -> None:
        self.registry = registry
        self.enabled = enabled  # False: requests are not recorded (benchmarks only)
        self.requests = Counter(
            "nebula_requests",
            "Requests by model, endpoint and final outcome (completed, client_gone, error) "
            "with the HTTP status (or the status of a stream's error event).",
            ["model", "endpoint", "outcome", "status"],
            registry=registry,
        )
        self.ttft = Histogram(
            "nebula_time_to_first_token_seconds",
            "Streamed requests: arrival at the gateway to the first token frame.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "nebula_inter_token_latency_seconds",
            "Streamed requests: mean time between output tokens after the first, one "
            "observation per request.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "nebula_e2e_request_latency_seconds",
            "Completed requests: arrival at the gateway to the last byte of the answer.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "nebula_request_queue_time_seconds",
            "Time a job waited in the model's queue until a worker started it.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "nebula_prompt_tokens", "Prompt (input) tokens of completed requests.", ["model"],
            registry=registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            "nebula_generation_tokens", "Generated (output) tokens of completed requests.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "nebula_requests_in_flight",
            "Requests this gateway holds open (queued or running).",
            ["model"],
            registry=registry,
        )
        self.published = Counter(
            "nebula_jobs_published",
            "Jobs this gateway queued (a transparent retry or a re-queue after a NATS "
            "restart counts again).",
            ["model"],
            registry=registry,
        )
        self.requeued = Counter(
            "nebula_jobs_requeued",
            "Jobs queued again: a silent worker's (retry) or lost with a NATS restart.",
            ["model"],
            registry=registry,
        )
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
        self._bound: dict[tuple[str, str], _Bound] = {}
        self.gauge_models: set[str] = set()  # models the queue gauges have series for

    def bound(self, model: str, endpoint: str) -> _Bound:
        b = self._bound.get((model, endpoint))
        if b is None:
            b = self._bound[(model, endpoint)] = _Bound(self, model, endpoint)
        return b


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
        self.b.in_flight.inc()

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
            self.m.requests.labels(UNKNOWN_MODEL, self.endpoint, outcome, str(status)).inc()
            return
        b.in_flight.dec()
        b.outcome(outcome, status).inc()
        if outcome != COMPLETED:
            return
        now = time.perf_counter()
        b.e2e.observe(now - self.start)
        if usage:
            prompt, _, completion = usage.partition(" ")
            if prompt.isdigit():
                b.prompt.inc(int(prompt))
            if completion.isdigit():
                n = int(completion)
                b.gen.inc(n)
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
        await asyncio.sleep(interval)
