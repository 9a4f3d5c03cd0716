"""Typed settings. Every process gets its settings passed in; nothing reads globals.

Each class has ``from_env`` (``NEBULA_*`` variables) and the CLI builds them from
flags whose defaults come from the same environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

DEFAULT_NATS_PORT = 4222
DEFAULT_NATS_URL = f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# The embedded server's max_payload sits above the body limit so a job of a body
# the gateway accepted (plus headers) always fits in one NATS message.
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024


def _env(name: str, default: str) -> str:
    return os.environ.get(f"NEBULA_{name}", default)


def default_data_dir() -> Path:
    return Path(_env("DATA_DIR", platformdirs.user_data_dir("nebula")))


@dataclass(frozen=True, kw_only=True)
class NatsSettings:
    url: str = DEFAULT_NATS_URL
    name: str = "nebula"
    # JetStream replicas for streams and buckets (3 on a 3-node NATS cluster).
    replicas: int = 1

    @classmethod
    def from_env(cls, **overrides: object) -> NatsSettings:
        base = cls(url=_env("NATS_URL", DEFAULT_NATS_URL), replicas=int(_env("NATS_REPLICAS", "1")))
        return _replace(base, overrides)


@dataclass(frozen=True, kw_only=True)
class EmbeddedNatsSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_NATS_PORT
    store_dir: Path = field(default_factory=lambda: default_data_dir() / "nats")
    max_payload: int = DEFAULT_MAX_PAYLOAD
    config_file: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = DEFAULT_MAX_BODY
    # Jobs waiting per model before publishes are refused with 429.
    max_queue: int = 256
    # How long a job may wait for a worker to start it (503 with no live worker, 504 if queued).
    dispatch_timeout: float = 30.0
    # Silence from a started job longer than this means its worker died.
    keepalive_timeout: float = 5.0
    retry_after: float = 1.0
    gateway_id: str | None = None
    # SIGTERM: open streams may finish this long, then each ends with an SSE error event.
    drain_timeout: float = 30.0
    # Flow control: answer bytes a worker may send ahead of what the client has read.
    stream_window: int = 256 * 1024
    # A client that reads nothing for this long while its stream is blocked is cut off.
    slow_client_timeout: float = 30.0
    # Connection hygiene: a request head must arrive within header_timeout, a body may
    # pause at most body_timeout, an idle keep-alive connection closes after idle_timeout;
    # connections beyond max_connections get 503.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 5.0
    max_connections: int = 4096

    @classmethod
    def from_env(cls, **overrides: object) -> GatewaySettings:
        base = cls(
            host=_env("HOST", "127.0.0.1"),
            port=int(_env("PORT", "8000")),
            max_body_bytes=int(_env("MAX_BODY_BYTES", str(DEFAULT_MAX_BODY))),
            max_queue=int(_env("MAX_QUEUE", "256")),
            dispatch_timeout=float(_env("DISPATCH_TIMEOUT", "30")),
            keepalive_timeout=float(_env("KEEPALIVE_TIMEOUT", "5")),
        )
        return _replace(base, overrides)


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    model: str
    max_concurrency: int = 8
    worker_id: str | None = None
    # First token goes out at once; later ones are batched up to this many or this long.
    batch_tokens: int = 16
    batch_ms: float = 15.0
    keepalive_interval: float = 1.0
    heartbeat_interval: float = 1.0
    # How long in-flight requests may finish after stop() before they are cancelled.
    drain_timeout: float = 30.0
    labels: dict[str, str] = field(default_factory=dict)
    # Engine health is checked this often; a failing engine stops pulling jobs until healthy.
    health_interval: float = 5.0
    health_timeout: float = 5.0
    # Largest max_tokens a request may ask for (400 beyond); the model spec's limit.
    max_output_tokens: int = 32768
    # A job delivered this many times without being taken goes to the dead-letter subject.
    max_deliver: int = 5
    # A job handed to a worker that never acks it goes back to the queue after this long.
    ack_wait: float = 10.0
    # A stream whose reader grants no flow-control credit this long is abandoned.
    credit_timeout: float = 60.0
    # Batch-job items: taken only while interactive work leaves a slot free; an item
    # not acked this long (its worker died) goes back to the queue.
    batch: bool = True
    batch_ack_wait: float = 60.0


@dataclass(frozen=True, kw_only=True)
class SimSettings:
    """The simulated engine: for exercising the fabric and load benchmarks only."""

    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    max_tokens: int = 16
    max_concurrency: int = 64


@dataclass(frozen=True, kw_only=True)
class OpenAIUpstreamSettings:
    url: str
    api_key: str | None = None
    # Model name to send upstream; defaults to the Nebula model name.
    upstream_model: str | None = None
    timeout: float = 600.0


def _replace(obj, overrides: dict[str, object]):
    from dataclasses import replace

    clean = {k: v for k, v in overrides.items() if v is not None}
    return replace(obj, **clean) if clean else obj


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    # binpack: fullest GPU that still fits; spread: emptiest GPU, replicas on distinct nodes.
    strategy: str = "binpack"
    # Leader lease: a standby takes over about this long after the leader dies.
    lease_ttl: float = 3.0
    # A node whose last heartbeat (local receive time) is older than this is down; node
    # agents beat every ~2 s, so this allows two missed beats and then some...
    node_ttl: float = 6.0
    # ...but its replicas move only after this much longer, so a NATS blip reshuffles nothing.
    node_grace: float = 10.0
    # Bursts of KV updates within this window make one reconcile pass.
    debounce: float = 0.05
    # Placement writes in flight at once (pipelined, each acked by JetStream).
    max_inflight_writes: int = 256
    # Value of the leader key; defaults to host-pid-random.
    scheduler_id: str | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> SchedulerSettings:
        base = cls(
            strategy=_env("SCHEDULER_STRATEGY", "binpack"),
            lease_ttl=float(_env("LEASE_TTL", "3")),
            node_ttl=float(_env("NODE_TTL", "6")),
            node_grace=float(_env("NODE_GRACE", "10")),
        )
        return _replace(base, overrides)


def parse_labels(text: str | Iterable[str]) -> dict[str, str]:
    """``"zone=a,gpu=h100"`` or ``["zone=a", "gpu=h100"]`` -> ``{"zone": "a", "gpu": "h100"}``."""
    from nebula.errors import InvalidRequest

    items = text.split(",") if isinstance(text, str) else list(text)
    labels: dict[str, str] = {}
    for item in items:
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"label {item.strip()!r} is not key=value", param="label")
        labels[key.strip()] = value.strip()
    return labels


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    """The node agent (``nebula node``): one per machine."""

    # Defaults to the host name; must be unique in the cluster.
    node_id: str | None = None
    # Matched against a model's label selector (``nebula model load --label``).
    labels: dict[str, str] = field(default_factory=dict)
    # Simulated GPUs ("2x80GiB", "80GiB,40GiB") instead of asking NVML; "" means none.
    simulated_gpus: str | None = None
    # Worker log files (one per placement); default: <data dir>/logs/<node id>.
    log_dir: Path | None = None
    # Heartbeats to the nodes bucket; the scheduler's node_ttl allows a few missed ones.
    heartbeat_interval: float = 2.0
    # Consecutive crashes after which a placement is marked Failed (and not restarted).
    max_crashes: int = 5
    # Restart delay after a crash: backoff_initial, doubling, at most backoff_max.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # A worker that ran this long before crashing starts a new crash count.
    stable_after: float = 60.0
    # A worker that has not reported ready this long after start counts as crashed.
    ready_timeout: float = 600.0
    # SIGTERM, then this long to drain in-flight requests, then SIGKILL.
    stop_timeout: float = 40.0

    @classmethod
    def from_env(cls, **overrides: object) -> NodeSettings:
        log_dir = _env("NODE_LOG_DIR", "")
        base = cls(
            node_id=_env("NODE_ID", "") or None,
            labels=parse_labels(_env("NODE_LABELS", "")),
            simulated_gpus=os.environ.get("NEBULA_SIMULATED_GPUS"),
            log_dir=Path(log_dir) if log_dir else None,
            heartbeat_interval=float(_env("NODE_HEARTBEAT_INTERVAL", "2")),
            max_crashes=int(_env("NODE_MAX_CRASHES", "5")),
        )
        return _replace(base, overrides)
