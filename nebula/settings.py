"""Typed settings: the ONE source of every setting's default, environment variable and
help. Every process gets its settings passed in; nothing reads globals.

A field declared with :func:`setting` carries its help and environment variable
(``NEBULA_<FIELD NAME>`` unless given); ``Cls.from_env(**overrides)`` reads those
variables, and the CLI derives its flags from the same fields
(:func:`nebula.cli_options.options_from`). Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import platformdirs

DEFAULT_NATS_PORT = 4222
DEFAULT_NATS_URL = f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# The embedded server's max_payload sits above the body limit so a job of a body
# the gateway accepted (plus headers) always fits in one NATS message.
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024

_S = TypeVar("_S")


def setting(default: Any, help: str, *, env: str | None = None, cli: bool = True) -> Any:
    """A settings field with its help and environment variable (default NEBULA_<NAME>)."""
    meta = {"help": help, "env": env, "cli": cli}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or f"NEBULA_{f.name.upper()}"


def settings_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """(field, resolved type) of every field declared with :func:`setting`."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``dict[str, str]`` -> dict."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return base_type(args[0])
    return typing.get_origin(tp) or tp


def parse_value(tp: Any, text: str) -> Any:
    kind = base_type(tp)
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if kind is dict:
        return parse_labels(text)
    if kind is Path:
        return Path(text)
    if text == "" and kind is not str:
        return None
    return kind(text)


def from_env(cls: type[_S], overrides: dict[str, Any]) -> _S:
    """Defaults, then NEBULA_* variables, then ``overrides`` (None means "not given")."""
    values: dict[str, Any] = {}
    for f, tp in settings_fields(cls):
        raw = os.environ.get(env_name(f))
        if raw is not None:
            try:
                values[f.name] = parse_value(tp, raw)
            except ValueError as e:
                from nebula.errors import InvalidRequest

                raise InvalidRequest(f"{env_name(f)}={raw!r}: {e}", param=f.name) from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"NEBULA_{name}", default)


def default_data_dir() -> Path:
    return Path(_env("DATA_DIR", platformdirs.user_data_dir("nebula")))


@dataclass(frozen=True, kw_only=True)
class NatsSettings:
    url: str = setting(
        DEFAULT_NATS_URL, "NATS server (or comma-separated cluster URLs).", env="NEBULA_NATS_URL"
    )
    name: str = "nebula"
    replicas: int | None = setting(
        None,
        "JetStream replicas for streams and buckets (default: 3 on a cluster of 3 or more "
        "servers, else 1); a higher count raises existing ones in place.",
        env="NEBULA_NATS_REPLICAS",
    )
    request_storage: str = setting(
        "auto",
        "Interactive request streams: memory (R1, fastest, lost with its server), file "
        "(replicated, survives losing a server) or auto (file on a cluster, else memory).",
        env="NEBULA_REQUEST_STORAGE",
    )
    retry_timeout: float = setting(
        10.0,
        "Seconds a JetStream call is retried while the cluster elects a leader.",
        env="NEBULA_NATS_RETRY_TIMEOUT",
    )

    @classmethod
    def from_env(cls, **overrides: object) -> NatsSettings:
        return from_env(cls, overrides)


@dataclass(frozen=True, kw_only=True)
class EmbeddedNatsSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_NATS_PORT
    store_dir: Path = field(default_factory=lambda: default_data_dir() / "nats")
    max_payload: int = DEFAULT_MAX_PAYLOAD
    config_file: Path | None = None
    # Clustering (``nebula nats --cluster``): the member's name must be unique.
    server_name: str | None = None
    cluster_name: str | None = None
    cluster_port: int = 6222
    routes: tuple[str, ...] = ()
    # False: clients use only the URLs they were given (behind a proxy or load balancer).
    advertise: bool = True

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    host: str = setting("127.0.0.1", "Address the HTTP API listens on.")
    port: int = setting(8000, "Port of the HTTP API.")
    max_body_bytes: int = setting(DEFAULT_MAX_BODY, "Larger request bodies get 413.")
    dispatch_timeout: float = setting(
        30.0, "Seconds a job may wait for a worker to start it (then 503, or 504 if queued)."
    )
    keepalive_timeout: float = setting(
        5.0, "Seconds of silence after which a started job's worker is presumed dead."
    )
    retry_after: float = setting(1.0, "Retry-After seconds on 429 and 503.")
    gateway_id: str | None = setting(None, "Reply-subject id (default: random).", cli=False)
    drain_timeout: float = setting(
        30.0, "On SIGTERM, seconds open requests may finish before each gets an error."
    )
    stream_window: int = setting(
        256 * 1024, "Flow control: answer bytes a worker may send ahead of the client."
    )
    slow_client_timeout: float = setting(
        30.0, "A client reading nothing this long while its stream is blocked is cut off."
    )
    header_timeout: float = setting(10.0, "Seconds for a request head to arrive (then 408).")
    body_timeout: float = setting(30.0, "Seconds a request body may stall (then 408).")
    # Longer than clients keep idle connections (httpx, so the openai client: 5 s;
    # load balancers: 60 s), so a client never reuses one just as we close it: with
    # both at 5 s that race fails a request now and then ("Connection error").
    idle_timeout: int = setting(75, "Seconds an idle keep-alive connection stays open.")
    max_connections: int = setting(
        4096, "Open connections at most; beyond, idle ones are evicted, then 503."
    )
    request_metrics: bool = setting(
        True, "Record per-request metrics (turn off only to measure what they cost)."
    )

    @classmethod
    def from_env(cls, **overrides: object) -> GatewaySettings:
        return from_env(cls, overrides)


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    model: str = setting("", "Model name clients ask for.", cli=False)
    max_concurrency: int = setting(8, "Jobs this worker runs at once.")
    worker_id: str | None = setting(None, "Worker id (default: w<pid>-<random>).", cli=False)
    batch_tokens: int = setting(16, "After the first token, tokens are batched up to this many...")
    batch_ms: float = setting(15.0, "...or this many milliseconds.")
    start_hold_ms: float = setting(
        10.0,
        "For gateway jobs (header Nebula-Start: lazy), the start frame waits this long "
        "for the first answer frame, which then carries it: one message less per request. "
        "0: start at once.",
    )
    keepalive_interval: float = setting(1.0, "Seconds between keepalive frames of a silent job.")
    heartbeat_interval: float = setting(
        1.0, "Seconds between worker heartbeats.", env="NEBULA_WORKER_HEARTBEAT_INTERVAL"
    )
    drain_timeout: float = setting(
        30.0,
        "On stop, seconds in-flight jobs may finish before they are cancelled.",
        env="NEBULA_WORKER_DRAIN_TIMEOUT",
    )
    labels: dict[str, str] = setting({}, "Worker labels.", cli=False)
    health_interval: float = setting(
        5.0, "Seconds between engine health checks (a failing engine takes no jobs)."
    )
    health_timeout: float = setting(5.0, "Seconds an engine health check may take.")
    stall_timeout: float = setting(
        300.0,
        "Seconds an engine may hold requests without producing output before the worker "
        "exits as hung, so its node agent restarts it (0: never).",
    )
    max_output_tokens: int = setting(32768, "Largest max_tokens a request may ask for.")
    max_deliver: int = setting(
        5, "A job delivered more often than this goes to the dead-letter subject."
    )
    ack_wait: float = setting(
        10.0, "Seconds before a job taken by a worker that never acked it is handed on."
    )
    credit_timeout: float = setting(
        60.0, "Seconds a stream may wait for flow-control credit before it is abandoned."
    )
    batch: bool = setting(True, "Also take batch-job items (when interactive work leaves room).")
    batch_ack_wait: float = setting(
        60.0, "Seconds before a batch item whose worker died is handed on."
    )

    @classmethod
    def from_env(cls, **overrides: object) -> WorkerSettings:
        return from_env(cls, overrides)


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


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    strategy: str = setting(
        "binpack",
        "binpack: fullest GPU that still fits; spread: emptiest GPU, replicas on distinct nodes.",
        env="NEBULA_SCHEDULER_STRATEGY",
    )
    lease_ttl: float = setting(
        3.0, "Leader lease: a standby takes over about this long after the leader dies."
    )
    # Node agents beat every ~2 s: node_ttl allows two missed beats and then some...
    node_ttl: float = setting(6.0, "A node silent this long is down.")
    # ...but its replicas move only after this much longer, so a NATS blip reshuffles nothing.
    node_grace: float = setting(10.0, "Seconds a silent node keeps its replicas before they move.")
    debounce: float = setting(0.05, "Bursts of KV updates within this window make one pass.")
    max_inflight_writes: int = setting(256, "Placement writes in flight at once.")
    scheduler_id: str | None = setting(None, "Leader key value (default: host-pid-random).")
    metrics_host: str = setting(
        "127.0.0.1", "Address the scheduler's /metrics listens on.",
        env="NEBULA_SCHEDULER_METRICS_HOST",
    )  # fmt: skip
    metrics_port: int | None = setting(
        9402, "Port of the scheduler's /metrics (empty: off).",
        env="NEBULA_SCHEDULER_METRICS_PORT",
    )  # fmt: skip

    @classmethod
    def from_env(cls, **overrides: object) -> SchedulerSettings:
        return from_env(cls, overrides)


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

    node_id: str | None = setting(None, "Unique node id (default: the host name).")
    labels: dict[str, str] = setting(
        {}, "Node labels k=v,k2=v2, matched by `model load --label`.", env="NEBULA_NODE_LABELS"
    )
    simulated_gpus: str | None = setting(
        None, "Simulated GPUs (2x80GiB, 80GiB,40GiB) instead of NVML.", env="NEBULA_SIMULATED_GPUS"
    )
    log_dir: Path | None = setting(
        None, "Worker log files (default: <data dir>/logs/<node id>).", env="NEBULA_NODE_LOG_DIR"
    )
    heartbeat_interval: float = setting(
        2.0, "Seconds between node heartbeats.", env="NEBULA_NODE_HEARTBEAT_INTERVAL"
    )
    max_crashes: int = setting(
        5, "Consecutive worker crashes before a placement is Failed.", env="NEBULA_NODE_MAX_CRASHES"
    )
    backoff_initial: float = setting(0.5, "First restart delay after a crash (doubling)...")
    backoff_max: float = setting(30.0, "...up to this many seconds.")
    stable_after: float = setting(60.0, "A worker that ran this long starts a new crash count.")
    ready_timeout: float = setting(600.0, "Seconds a starting worker has to report ready.")
    stop_timeout: float = setting(40.0, "SIGTERM, this long to drain, then SIGKILL.")
    vllm_python: str | None = setting(
        None,
        "Python interpreter for vllm workers, for sites that keep vLLM in its own "
        "environment (Nebula must be installed there too).",
    )
    metrics_host: str = setting(
        "127.0.0.1", "Address /metrics (this node and its workers) listens on.",
        env="NEBULA_NODE_METRICS_HOST",
    )  # fmt: skip
    metrics_port: int | None = setting(
        9401, "Port of the node's /metrics (empty: off).", env="NEBULA_NODE_METRICS_PORT"
    )

    @classmethod
    def from_env(cls, **overrides: object) -> NodeSettings:
        return from_env(cls, overrides)
