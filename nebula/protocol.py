"""Payloads on the wire: msgspec Structs, frozen and kw_only.

New fields always get defaults so processes of mixed versions interoperate.
Frame metadata travels in NATS headers (names in :mod:`nebula.subjects`); frame
bodies are bytes ready to write to the HTTP client.
"""

from __future__ import annotations

import enum

import msgspec


class FrameKind(enum.StrEnum):
    START = "start"
    DATA = "data"
    KEEPALIVE = "keepalive"
    END = "end"
    ERROR = "error"


class Endpoint(enum.StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


class WorkerCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Counters since the worker started (its node agent exports them as metrics, and
    keeps a gone worker's last values in its model's totals)."""

    jobs_started: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    jobs_cancelled: int = 0
    jobs_redelivered: int = 0
    jobs_dead_lettered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class WorkerInfo(WorkerCounters, frozen=True, kw_only=True):
    """A worker's heartbeat in the workers bucket: proof that a model has a live replica."""

    worker_id: str
    model: str
    engine: str
    owned_by: str = "nebula"
    node_id: str = ""
    max_concurrency: int = 1
    inflight: int = 0
    started_at: float = 0.0
    ready: bool = True
    draining: bool = False
    # False while the engine fails its periodic health check (the worker pulls nothing).
    healthy: bool = True
    reason: str = ""
    # The engine's own view (Engine.load()): requests it runs and queues, KV cache in use.
    engine_running: int = 0
    engine_waiting: int = 0
    kv_cache_usage: float = 0.0
    # LoRA adapters this replica has loaded (each served as its own model name).
    adapters: list[str] = msgspec.field(default_factory=list)
    # While starting (ready False): what the worker is doing, e.g. "loading weights".
    phase: str = ""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Desired state of one model (the models bucket)."""

    name: str
    engine: str
    model_path: str | None = None
    replicas: int = 1
    gpu_memory: float = 0.0
    max_concurrency: int = 8
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    engine_args: list[str] = msgspec.field(default_factory=list)
    engine_options: dict[str, str] = msgspec.field(default_factory=dict)
    created_at: float = 0.0
    # The model's own queue bound, enforced by JetStream for every gateway alike.
    max_queue: int = 256
    max_queue_bytes: int = 16 * 1024 * 1024
    # Largest max_tokens a request may ask for (400 beyond).
    max_output_tokens: int = 32768
    # LoRA adapters: name -> path. Each name is a model in /v1/models whose requests
    # queue with this model's and run on its replicas, which load the adapter.
    adapters: dict[str, str] = msgspec.field(default_factory=dict)
    # Request migration: continuations a stream may get on another replica after its
    # worker died mid-answer (0: off; the client gets an error event instead).
    migrate: int = 0


class PlacementState(enum.StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    READY = "Ready"
    FAILED = "Failed"
    UNLOADING = "Unloading"


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """One replica of one model bound (or not yet) to a node (the placements bucket)."""

    model: str
    replica: int
    node_id: str | None = None
    gpu_ids: list[int] = msgspec.field(default_factory=list)
    memory_fraction: float = 0.0
    state: PlacementState = PlacementState.PENDING
    reason: str = ""
    worker_id: str | None = None
    updated_at: float = 0.0


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str = ""
    memory_total: int = 0
    memory_free: int = 0
    utilization: float = -1.0  # NVML's GPU utilisation in [0, 1]; -1: not known (simulated)


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A node agent's heartbeat (the nodes bucket, expires by TTL)."""

    node_id: str
    hostname: str = ""
    gpus: list[GpuInfo] = msgspec.field(default_factory=list)
    cpu_count: int = 0
    memory_total: int = 0
    memory_free: int = 0
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    workers: int = 0
    heartbeat_at: float = 0.0


class JobState(enum.StrEnum):
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    CANCELLED = "cancelled"


class BatchJob(msgspec.Struct, frozen=True, kw_only=True):
    """A batch job's record (the jobs bucket). Its items are messages on the model's
    job subject; its results are messages on ``result.<job>.<item>``."""

    job_id: str
    model: str
    endpoint: str = "embedding"
    total: int = 0
    state: JobState = JobState.SUBMITTING
    created_at: float = 0.0


class BatchEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One item of a packed job message: its id (unique within the job) and its
    request body, kept as the publisher's bytes (the engine reads them unchanged)."""

    id: str
    body: msgspec.Raw


class BatchPack(msgspec.Struct, frozen=True, kw_only=True):
    """A job message of many items (header ``Nebula-Items``: their count). Each item
    still gets its own result on ``result.<job>.<item>``; the message is acked once
    all of them are stored."""

    items: list[BatchEntry]
