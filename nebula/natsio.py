"""NATS connection and the JetStream resources every process relies on.

Streams and buckets are created idempotently by whichever process starts first,
so no process depends on start order and no state lives outside JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from nebula import subjects
from nebula.errors import Unavailable
from nebula.protocol import ModelSpec
from nebula.settings import NatsSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Seconds a heartbeat stays valid: workers/nodes beat every few seconds.
WORKER_TTL = 15.0
NODE_TTL = 30.0
# A worker whose last heartbeat (every second) is older than this is not live.
WORKER_LIVE_WINDOW = 3.5
# Longest pause between two retries of a JetStream call through an election (before jitter).
RETRY_MAX_DELAY = 0.25


_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
)


# What a JetStream call answers while a stream or the meta group has no leader (a
# server died, an election runs): worth retrying. Anything else is a real answer.
_TRANSIENT_TEXT = (
    "not ready",
    "temporarily unavailable",
    "no suitable peers",
    "leader",
    "stream is offline",
)
# 503s that are a real answer: a full queue (messages, bytes), storage exhausted, too large.
_FINAL_ERR_CODES = frozenset({10077, 10078, 10047, 10048, 10028, 10023, 10054})


def transient(e: BaseException) -> bool:
    """True for an error a JetStream call gives while the cluster elects a leader."""
    if isinstance(
        e,
        nats.errors.TimeoutError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.StaleConnectionError
        | nats.errors.UnexpectedEOF
        | NoStreamResponseError  # a publish answered 503: the stream has no leader yet
        | TimeoutError,
    ):
        return True
    if isinstance(e, APIError):
        if e.err_code in _FINAL_ERR_CODES:
            return False
        text = (e.description or "").lower()
        return e.code in (503, 504) or any(t in text for t in _TRANSIENT_TEXT)
    return False


def raise_if_cancelled() -> None:
    """Raise the cancel a NATS call may have swallowed. nats-py turns a CancelledError
    inside a request into its own TimeoutError in places (and 3.11's wait_for can
    return the answer anyway): the task is still marked as cancelling but nothing
    raises any more, so a retry loop that catches Exception and sleeps would go on
    forever and shutdown would wait for it. Every such loop calls this before it
    sleeps."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def retrying(
    op: Callable[[], Awaitable[_T]],
    *,
    timeout: float,
    what: str,
    nc: Client | None = None,
) -> _T:
    """Run a JetStream call, retrying transient failures (leader election, a failover
    to another server) with capped exponential backoff and jitter for ``timeout``
    seconds; then, or on any other error, the last error is raised. Only idempotent
    calls belong here (publishes carry a message id so JetStream drops a repeat)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except Exception as e:
            raise_if_cancelled()
            if not transient(e) or (nc is not None and nc.is_closed):
                raise
            # Jitter spreads the retries of many processes hit by one election.
            pause = delay * random.uniform(0.5, 1.5)
            if time.monotonic() + pause >= deadline:
                raise
            log.info("%s failed (%r), retry %d in %.2fs", what, e, attempt, pause)
            await asyncio.sleep(pause)
            # Capped low: a stream elects its new leader 3-9 s after one dies, and each
            # retry after that moment is time the caller waits for nothing.
            delay = min(delay * 2, RETRY_MAX_DELAY)


# Replicas of streams and buckets unless configured: three where JetStream can place
# them (a cluster of three or more servers), else one.
AUTO_REPLICAS = 3
# JetStream's answers to "this many replicas cannot be placed": a server that is not
# clustered (JSStreamReplicasNotSupportedErr), a cluster with fewer servers (up) than
# asked for (JSClusterNoPeersErrF).
_NO_REPLICAS = frozenset({10074, 10005})


def cannot_replicate(e: BaseException) -> bool:
    """True for JetStream refusing a replica count the cluster cannot hold."""
    return isinstance(e, APIError) and e.err_code in _NO_REPLICAS


async def create_replicated(
    settings: NatsSettings, create: Callable[[int], Awaitable[_T]], what: str
) -> _T:
    """Create a stream or bucket with the configured replicas, or in auto mode with
    AUTO_REPLICAS, falling back to one where JetStream itself answers that it cannot
    place them. The server is asked, not guessed at from what it advertises to clients
    (which is empty with ``no_advertise``)."""
    if settings.replicas:
        return await create(settings.replicas)
    try:
        return await create(AUTO_REPLICAS)
    except APIError as e:
        if not cannot_replicate(e):
            raise
        log.info("%s: one replica (%s)", what, e.description)
        return await create(1)


def request_storage(settings: NatsSettings) -> list[tuple[StorageType, int | None]]:
    """(storage, replicas) to try, in order, for an interactive request stream: memory
    R1, or file replicated (None: the replica count ``create_replicated`` settles on);
    auto tries file on a cluster first and falls back to memory where JetStream cannot
    replicate."""
    if settings.request_storage == "memory":
        return [(StorageType.MEMORY, 1)]
    if settings.request_storage == "file":
        return [(StorageType.FILE, None)]
    if settings.replicas:  # auto with a configured count: replicated means file
        return [
            (StorageType.FILE, settings.replicas)
            if settings.replicas > 1
            else (StorageType.MEMORY, 1)
        ]
    return [(StorageType.FILE, AUTO_REPLICAS), (StorageType.MEMORY, 1)]


async def _raise_replicas(js: JetStreamContext, settings: NatsSettings, info: Any) -> None:
    """Raise a stream's replica count in place: JetStream copies the data to the new
    peers, nothing is lost. Never lowered here (that is an operator's decision). In
    auto mode JetStream refusing (no cluster, a server down) leaves it as it is."""
    want = settings.replicas or AUTO_REPLICAS
    have = info.config.num_replicas or 1
    if want <= have:
        return
    config = info.config
    config.num_replicas = want
    try:
        await js.update_stream(config)
    except APIError as e:  # e.g. fewer servers than replicas: keep serving as is
        if cannot_replicate(e) and not settings.replicas:
            log.debug("%s stays at %d replicas: %s", config.name, have, e.description)
        else:
            log.warning("could not raise %s to %d replicas: %s", config.name, want, e.description)
        return
    log.warning("raised JetStream stream %s from %d to %d replicas", config.name, have, want)


class ReconnectHooks:
    """Callbacks run after NATS comes back: resources in memory storage (the request
    stream, pull requests, watchers) must be re-created by whoever uses them."""

    def __init__(self) -> None:
        self._hooks: list[Callable[[], Awaitable[None]]] = []

    def add(self, hook: Callable[[], Awaitable[None]]) -> None:
        self._hooks.append(hook)

    def remove(self, hook: Callable[[], Awaitable[None]]) -> None:
        with contextlib.suppress(ValueError):
            self._hooks.remove(hook)

    async def __call__(self) -> None:
        for hook in list(self._hooks):
            try:
                await hook()
            except Exception:
                log.exception("reconnect hook %r failed", hook)


async def connect(
    settings: NatsSettings,
    *,
    name: str,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    connect_timeout: float = 5.0,
) -> Client:
    """Connect and keep reconnecting forever: a NATS restart must not kill any process."""

    async def _error_cb(e: Exception) -> None:
        # Connection trouble is expected noise while reconnecting (the disconnect is
        # logged once, below); anything else here is a bug in a callback of ours.
        if isinstance(e, nats.errors.SlowConsumerError):
            log.warning("%s: NATS dropped messages for a slow subscription: %r", name, e)
        elif isinstance(e, _CONNECTION_ERRORS) or "expecting INFO" in str(e):
            # (nats-py's plain Error for a server that closed before its greeting)
            log.debug("nats connection error (%s): %r", name, e)
        else:
            log.error("error in a NATS callback (%s): %r", name, e, exc_info=e)

    client: list[Client] = []

    async def _disconnected_cb() -> None:
        if client and not (client[0].is_closed or client[0].is_draining):
            log.warning("%s: disconnected from NATS, reconnecting", name)

    async def _reconnected_cb() -> None:
        log.warning("%s: reconnected to NATS", name)
        if on_reconnect is not None:
            await on_reconnect()

    servers = [u.strip() for u in settings.url.split(",") if u.strip()]
    # nats-py retries an unreachable first server forever when reconnects are on:
    # probe first so an absent NATS is a clear error, not a hang.
    await probe(servers, connect_timeout)
    try:
        nc = await nats.connect(
            servers,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=_error_cb,
            disconnected_cb=_disconnected_cb,
            reconnected_cb=_reconnected_cb,
        )
    except Exception as e:  # nats raises several unrelated types for "unreachable"
        raise Unavailable(f"cannot reach NATS at {settings.url}: {e or type(e).__name__}") from e
    client.append(nc)
    return nc


async def probe(servers: list[str], timeout: float) -> None:
    errors = []
    for url in servers:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(parsed.hostname, parsed.port or 4222)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        except (OSError, TimeoutError) as e:
            errors.append(f"{url}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
    raise Unavailable(f"cannot reach NATS at {', '.join(errors) or 'no server given'}")


async def ensure_request_stream(
    js: JetStreamContext,
    settings: NatsSettings,
    model: str,
    spec: ModelSpec | None = None,
    *,
    update: bool = False,
) -> None:
    """The model's interactive work-queue stream, bounded by its spec (or the spec's
    defaults for a model run by hand). Workers ack a job the moment they take it, so
    only waiting jobs count. Storage per ``request_storage``: memory R1 is the fastest
    (a NATS restart loses what waits, and gateways queue those again), file R3 keeps
    every waiting job through the loss of a server. Only ``update`` (model load, which
    owns the spec) rewrites the bounds of a stream that exists; a lower replica count
    than configured is raised in place."""
    bounds = spec or ModelSpec(name=model, engine="")
    choices = request_storage(settings)
    name = subjects.req_stream(model)

    def config(storage: StorageType, num_replicas: int) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subjects.req_subject(model)],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=storage,
            discard=DiscardPolicy.NEW,
            max_msgs=bounds.max_queue,
            max_bytes=bounds.max_queue_bytes,
            num_replicas=num_replicas,
            max_age=3600.0,
            # Gateways retry a publish whose ack was lost: the message id drops the repeat.
            duplicate_window=120.0,
        )

    async def create() -> None:
        for i, (storage, n) in enumerate(choices):
            last = i == len(choices) - 1

            async def add(r: int, storage: StorageType = storage) -> None:
                await js.add_stream(config(storage, r))

            try:
                if n is None:
                    await create_replicated(settings, add, name)
                else:
                    await js.add_stream(config(storage, n))
                return
            except APIError as e:
                if last or not cannot_replicate(e):
                    raise
                log.info("request stream %s: %s (%s)", name, choices[-1][0].value, e.description)

    async def ensure() -> None:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            try:
                await create()
                return
            except BadRequestError as e:
                if cannot_replicate(e):
                    raise
                info = await js.stream_info(name)  # another process made it just now
        storages = {storage for storage, _ in choices}
        if info.config.storage not in storages:
            log.warning(
                "request stream %s uses %s storage, not the configured %s: JetStream cannot "
                "change it in place; unload and load the model to move it",
                name,
                info.config.storage,
                settings.request_storage,
            )
        elif info.config.storage == StorageType.FILE:
            have = info.config.num_replicas or 1
            await _raise_replicas(js, settings, info)
            if (settings.replicas or AUTO_REPLICAS) > have:
                info = await js.stream_info(name)
        if update and (info.config.max_msgs, info.config.max_bytes) != (
            bounds.max_queue,
            bounds.max_queue_bytes,
        ):
            info.config.max_msgs = bounds.max_queue
            info.config.max_bytes = bounds.max_queue_bytes
            await js.update_stream(info.config)

    await retrying(ensure, timeout=settings.retry_timeout, what=f"ensure stream {name}")


async def model_spec(js: JetStreamContext, settings: NatsSettings, model: str) -> ModelSpec | None:
    """The model's desired spec, if it was loaded (a worker run by hand has none)."""
    kv = await models_bucket(js, settings)
    try:
        entry = await kv.get(subjects.model_key(model))
    except Exception:
        return None
    try:
        return msgspec.json.decode(entry.value or b"", type=ModelSpec)
    except msgspec.DecodeError:
        return None


async def ensure_bucket(
    js: JetStreamContext,
    settings: NatsSettings,
    bucket: str,
    *,
    ttl: float | None = None,
    history: int = 1,
) -> KeyValue:
    async def ensure() -> KeyValue:
        try:
            kv = await js.key_value(bucket)
        except NotFoundError:
            try:
                return await create_replicated(
                    settings,
                    lambda n: js.create_key_value(
                        KeyValueConfig(
                            bucket=bucket, ttl=ttl, history=history, storage=StorageType.FILE,
                            replicas=n,
                        )
                    ),
                    bucket,
                )  # fmt: skip
            except BadRequestError as e:
                if cannot_replicate(e):
                    raise
                return await js.key_value(bucket)  # another process made it just now
        await _raise_replicas(js, settings, await js.stream_info(subjects.kv_stream(bucket)))
        return kv

    return await retrying(ensure, timeout=settings.retry_timeout, what=f"ensure bucket {bucket}")


async def workers_bucket(js: JetStreamContext, settings: NatsSettings) -> KeyValue:
    return await ensure_bucket(js, settings, subjects.WORKERS_BUCKET, ttl=WORKER_TTL)


async def models_bucket(js: JetStreamContext, settings: NatsSettings) -> KeyValue:
    return await ensure_bucket(js, settings, subjects.MODELS_BUCKET)


async def close_connection(nc: Client) -> None:
    """Drain when connected (deliver what is buffered), otherwise just close."""
    try:
        if nc.is_connected:
            await nc.drain()
            return
    except Exception as e:
        log.debug("drain failed: %s", e)
    with contextlib.suppress(Exception):
        await nc.close()


async def placements_bucket(js: JetStreamContext, settings: NatsSettings) -> KeyValue:
    return await ensure_bucket(js, settings, subjects.PLACEMENTS_BUCKET)


async def nodes_bucket(js: JetStreamContext, settings: NatsSettings) -> KeyValue:
    return await ensure_bucket(js, settings, subjects.NODES_BUCKET, ttl=NODE_TTL)


async def entries(
    kv: KeyValue, watcher: KeyValue.KeyWatcher
) -> AsyncIterator[KeyValue.Entry | None]:
    """A KV watch's entries, with ONE ``None`` once the bucket's current values are all
    delivered, then live updates.

    nats-py's own marker can come first: it asks the server how much is pending just
    after subscribing, and a snapshot already on its way (delivered by the server, not
    yet read by the client) counts as nothing pending. Trusted as is, a full bucket
    would read as empty. Here the marker comes after the entry with nothing pending
    behind it, or, for nats-py's early marker, only if the bucket really is empty."""
    synced = False
    async for entry in watcher:
        if entry is None:
            if not synced and (await kv.status()).values == 0:
                synced = True
                yield None
            continue
        yield entry
        if not synced and entry.delta == 0:
            synced = True
            yield None


async def read_all(kv: KeyValue) -> dict[str, KeyValue.Entry]:
    """Every live key of a bucket in one pass (a watch of last values, then stop)."""
    out: dict[str, KeyValue.Entry] = {}
    watcher = await kv.watchall()
    try:
        async for entry in entries(kv, watcher):
            if entry is None:
                break
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                out.pop(entry.key, None)
            else:
                out[entry.key] = entry
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    return out


async def watch_lost(watcher: KeyValue.KeyWatcher, every: float = 2.0, misses: int = 5) -> None:
    """Return once a KV watch can no longer deliver: its consumer is gone (it lived on
    a NATS server that died; nats-py's KV watch has no idle heartbeat, so it would wait
    forever), or the server has not answered for ``misses`` checks in a row. The
    caller starts the watch again, reading the current values afresh."""
    sub = watcher._sub
    if sub is None:
        return
    failed = 0
    while True:
        await asyncio.sleep(every)
        try:
            await sub.consumer_info()
            failed = 0
        except NotFoundError:
            return
        except Exception:  # an election or a reconnect under way: look again
            raise_if_cancelled()
            failed += 1
            if failed >= misses:
                return


async def ensure_dlq_stream(js: JetStreamContext, settings: NatsSettings) -> None:
    """Dead letters outlive NATS restarts (file storage) and age out after a week."""
    config = StreamConfig(
        name=subjects.DLQ_STREAM,
        subjects=[subjects.dlq_subjects_all()],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_msgs=100_000,
        max_age=7 * 24 * 3600.0,
    )
    await _ensure_stream(js, settings, config)


async def _ensure_stream(
    js: JetStreamContext, settings: NatsSettings, config: StreamConfig
) -> None:
    """Create a stream (replicated as ``create_replicated`` decides), or raise the
    replicas of one that exists; retried through elections."""
    name = config.name
    assert name is not None

    async def add(n: int) -> None:
        await js.add_stream(dataclasses.replace(config, num_replicas=n))

    async def ensure() -> None:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            try:
                await create_replicated(settings, add, name)
            except BadRequestError as e:  # another process made it a moment ago
                if cannot_replicate(e):
                    raise
            return
        await _raise_replicas(js, settings, info)

    await retrying(ensure, timeout=settings.retry_timeout, what=f"ensure stream {name}")


async def ensure_batch_streams(js: JetStreamContext, settings: NatsSettings) -> None:
    """Batch items and their results survive NATS restarts (file storage); a result is
    kept once per item (max_msgs_per_subject=1), so duplicates collapse where stored."""
    configs = [
        StreamConfig(
            name=subjects.JOB_STREAM,
            subjects=[subjects.job_subjects_all()],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            duplicate_window=600.0,
        ),
        StreamConfig(
            name=subjects.RESULT_STREAM,
            subjects=[subjects.result_subjects_all()],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            max_age=7 * 24 * 3600.0,
        ),
    ]
    for config in configs:
        await _ensure_stream(js, settings, config)


async def jobs_bucket(js: JetStreamContext, settings: NatsSettings) -> KeyValue:
    return await ensure_bucket(js, settings, subjects.JOBS_BUCKET)
