"""The node agent's ``/metrics``: the machine (GPUs from NVML) and the workers it runs.

Workers report through the heartbeat they already send every second (a
``WorkerInfo`` carrying their slots, the engine's running/waiting/KV-cache figures
and their job counters); the node agent, subscribed to its own workers' heartbeats,
exports them. So a machine is one scrape target however many workers come and go,
a worker opens no port, and nothing new runs on the worker's hot path.

Counters stay monotonic across worker restarts: when a worker goes, its last
reported counts are kept per model and added to the live ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.protocol import NodeInfo, WorkerCounters, WorkerInfo

# WorkerInfo counter field -> (metric, help, extra label value)
_JOB_OUTCOMES = (
    ("jobs_completed", "completed"),
    ("jobs_failed", "failed"),
    ("jobs_cancelled", "cancelled"),
)


def _add(totals: dict[str, int], info: WorkerCounters) -> dict[str, int]:
    for name in WorkerCounters.__struct_fields__:
        totals[name] = totals.get(name, 0) + getattr(info, name)
    return totals


@dataclass
class NodeView:
    """What the collector reads: filled by the node agent."""

    node_id: str
    node_info: Callable[[], NodeInfo | None]
    workers: Callable[[], Iterable[WorkerInfo]]
    # Per model: the counters of its workers that are gone (their last heartbeat's).
    retired: dict[str, dict[str, int]] = field(default_factory=dict)
    crashes: Callable[[], int] = lambda: 0

    def retire(self, info: WorkerInfo) -> None:
        _add(self.retired.setdefault(info.model, {}), info)


class NodeCollector(Collector):
    def __init__(self, view: NodeView) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        v = self.view
        node = v.node_id
        yield from self._gpus(node, v.node_info())
        per_model: dict[str, list[WorkerInfo]] = {}
        for info in v.workers():
            per_model.setdefault(info.model, []).append(info)

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["node", *labels])

        slots = gauge(
            "nebula_worker_slots", "Job slots of this node's workers.", ["model", "state"]
        )
        workers = gauge("nebula_workers", "Worker processes by state.", ["model", "state"])
        running = gauge(
            "nebula_engine_requests_running", "Requests the engines run now.", ["model"]
        )
        waiting = gauge(
            "nebula_engine_requests_waiting", "Requests queued inside the engines.", ["model"]
        )
        kv = gauge(
            "nebula_engine_kv_cache_usage_ratio",
            "KV cache in use (0-1), the fullest worker of the model on this node; 0 for "
            "engines without one.",
            ["model"],
        )
        for model, infos in sorted(per_model.items()):
            busy = sum(i.inflight for i in infos)
            total = sum(i.max_concurrency for i in infos if i.ready)
            slots.add_metric([node, model, "busy"], busy)
            slots.add_metric([node, model, "free"], max(0, total - busy))
            counts = {"ready": 0, "draining": 0, "unhealthy": 0, "starting": 0}
            for i in infos:
                state = (
                    "draining" if i.draining
                    else "unhealthy" if not i.healthy
                    else "ready" if i.ready
                    else "starting"
                )  # fmt: skip
                counts[state] += 1
            for state, n in counts.items():
                workers.add_metric([node, model, state], n)
            running.add_metric([node, model], sum(i.engine_running for i in infos))
            waiting.add_metric([node, model], sum(i.engine_waiting for i in infos))
            kv.add_metric([node, model], max(i.kv_cache_usage for i in infos))
        yield from (slots, workers, running, waiting, kv)

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["node", *labels])

        jobs = counter(
            "nebula_worker_jobs", "Jobs this node's workers ran, by outcome.", ["model", "outcome"]
        )
        redelivered = counter(
            "nebula_jobs_redelivered",
            "Jobs JetStream delivered again (a worker died or never acked in time).",
            ["model"],
        )
        dead = counter(
            "nebula_jobs_dead_lettered",
            "Jobs parked on the dead-letter subject (poison, or redelivered too often).",
            ["model"],
        )
        for model in sorted(set(per_model) | set(v.retired)):
            t = dict(v.retired.get(model, {}))
            for info in per_model.get(model, []):
                _add(t, info)
            for attr, outcome in _JOB_OUTCOMES:
                jobs.add_metric([node, model, outcome], t.get(attr, 0))
            redelivered.add_metric([node, model], t.get("jobs_redelivered", 0))
            dead.add_metric([node, model], t.get("jobs_dead_lettered", 0))
        crashes = counter("nebula_worker_crashes", "Worker processes that exited on their own.", [])
        crashes.add_metric([node], v.crashes())
        yield from (jobs, redelivered, dead, crashes)

    @staticmethod
    def _gpus(node: str, info: NodeInfo | None) -> Iterable[Metric]:
        labels = ["node", "gpu", "name"]
        util = GaugeMetricFamily(
            "nebula_gpu_utilization_ratio",
            "GPU utilisation (0-1) from NVML over its last sample period.",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "nebula_gpu_memory_used_bytes", "GPU memory in use.", labels=labels
        )
        total = GaugeMetricFamily("nebula_gpu_memory_total_bytes", "GPU memory.", labels=labels)
        for g in info.gpus if info is not None else []:
            lv = [node, str(g.index), g.name]
            if g.utilization >= 0:
                util.add_metric(lv, g.utilization)
            used.add_metric(lv, g.memory_total - g.memory_free)
            total.add_metric(lv, g.memory_total)
        return [util, used, total]
