"""A small Python client for batch jobs over NATS: submit, wait, collect.

    async with await BatchClient.connect("nats://127.0.0.1:4222") as client:
        job = await client.create("all-minilm-l6-v2", total=len(texts))
        await client.submit(job, ((str(i), {"input": t}) for i, t in enumerate(texts)))
        async for result in client.results(job.job_id):
            print(result.item_id, result.status, result.json())

Delivery underneath is at least once; results are keyed by job and item id (the
results stream keeps one message per item), so a publisher may disconnect, a worker
may die and NATS may restart, and every item still ends with exactly one result.
Any NATS client can do the same: the subjects and headers are in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from nebula import natsio, subjects
from nebula.errors import Conflict, ModelNotFound, NebulaError, Unavailable
from nebula.protocol import BatchJob, Endpoint, JobState
from nebula.settings import NatsSettings

# Publishes in flight at once while submitting (each acked by JetStream).
SUBMIT_WINDOW = 512
# Items per job message, and the most body bytes in one (well under max_payload): one
# message in and one ack per many items instead of per item (the per-message cost is
# what a worker spends most of its own time on).
PACK_ITEMS = 64
PACK_BYTES = 1 << 20
_HEADER_ROOM = 4096


def _is_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data, type=msgspec.Raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


def _pack(group: list[tuple[str, bytes]]) -> bytes:
    """``{"items": [{"id": ..., "body": ...}, ...]}`` around bodies already encoded."""
    parts = [b'{"id":%s,"body":%s}' % (msgspec.json.encode(i), d) for i, d in group]
    return b'{"items":[' + b",".join(parts) + b"]}"


@dataclass(frozen=True, slots=True)
class Result:
    item_id: str
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return self.status == 200

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


@dataclass(frozen=True, slots=True)
class JobStatus:
    job: BatchJob
    done: int
    queued: int

    @property
    def complete(self) -> bool:
        return self.job.state is not JobState.SUBMITTING and self.done >= self.job.total


class BatchClient:
    def __init__(self, nc: Client, settings: NatsSettings, jobs: KeyValue, *, owns: bool) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self._jobs = jobs
        self._owns = owns

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> BatchClient:
        settings = NatsSettings(url=url, **kw)
        nc = await natsio.connect(settings, name="nebula-batch")
        return await cls.open(nc, settings, owns=True)

    @classmethod
    async def open(cls, nc: Client, settings: NatsSettings, *, owns: bool = False) -> BatchClient:
        js = nc.jetstream()
        await natsio.ensure_batch_streams(js, settings)
        return cls(nc, settings, await natsio.jobs_bucket(js, settings), owns=owns)

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns:
            self._owns = False
            await natsio.close_connection(self.nc)

    # --- jobs ---------------------------------------------------------------------

    async def create(
        self,
        model: str,
        *,
        total: int,
        job_id: str | None = None,
        endpoint: str = "embedding",
        check_model: bool = True,
    ) -> BatchJob:
        """A new job record, or the existing one with that id (resuming)."""
        if job_id is not None:
            existing = await self.get(job_id)
            if existing is not None:
                if existing.model != model:
                    raise Conflict(f"job {job_id} exists for model `{existing.model}`")
                return existing
        if check_model:
            await self._check_model(model)
        job = BatchJob(
            job_id=job_id or uuid.uuid4().hex,
            model=model,
            endpoint=endpoint,
            total=total,
            created_at=time.time(),
        )
        await self._put(job)
        return job

    async def _check_model(self, model: str) -> None:
        """Items for a model nobody serves would wait forever: refuse them up front."""
        js = self.js
        models = await natsio.models_bucket(js, self.settings)
        workers = await natsio.workers_bucket(js, self.settings)
        with contextlib.suppress(KeyNotFoundError):
            await models.get(subjects.model_key(model))
            return
        live = await natsio.read_all(workers)
        if any(k.partition(".")[0] == subjects.model_token(model) for k in live):
            return
        raise ModelNotFound(f"The model `{model}` does not exist or is not loaded.", param="model")

    async def get(self, job_id: str) -> BatchJob | None:
        try:
            entry = await self._jobs.get(subjects.job_key(job_id))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=BatchJob)

    async def _set_state(self, job: BatchJob, state: JobState) -> BatchJob:
        job = msgspec.structs.replace(job, state=state)
        await self._put(job)
        return job

    async def _put(self, job: BatchJob) -> None:
        """Store the job record, riding through a leader election (a put is idempotent)."""
        data = msgspec.json.encode(job)
        await natsio.retrying(
            lambda: self._jobs.put(subjects.job_key(job.job_id), data),
            timeout=self.settings.retry_timeout,
            what="store a batch job",
            nc=self.nc,
        )

    async def submit(
        self,
        job: BatchJob,
        items: Iterable[tuple[str, bytes | dict[str, Any]]],
        *,
        on_acked: Callable[[int], None] | None = None,
        pack: int | None = None,
        pack_bytes: int = PACK_BYTES,
    ) -> int:
        """Publish items (id, request body); returns how many were acked by JetStream.

        Up to ``pack`` items (and ``pack_bytes`` of body) travel in one job message
        (``Nebula-Items``), each still with a result of its own; ``pack=1`` sends the
        one-item form. By default embedding items are packed by ``PACK_ITEMS`` and
        others (chat and completions, each a long generation) go one per message.
        Every message carries a ``Nats-Msg-Id`` made of the job and its items, so a
        resubmission inside the stream's duplicate window is dropped by JetStream.
        ``on_acked(n)``: the first ``n`` items are queued.
        """
        per_msg = pack or (PACK_ITEMS if job.endpoint == Endpoint.EMBEDDING.value else 1)
        subject = subjects.job_subject(job.model)
        limit = max(min(pack_bytes, self.nc.max_payload - _HEADER_ROOM), 1)
        pending: list[asyncio.Future[Any]] = []
        counts: list[int] = []
        sent = 0

        async def settle() -> None:
            nonlocal sent
            for fut in pending:
                await fut
            sent += sum(counts)
            pending.clear()
            counts.clear()
            if on_acked is not None:
                on_acked(sent)

        def send(data: bytes, headers: dict[str, str], n: int) -> None:
            pending.append(asyncio.ensure_future(self._publish(subject, data, headers)))
            counts.append(n)

        group: list[tuple[str, bytes]] = []
        size = 0

        def flush_group() -> None:
            nonlocal size
            if not group:
                return
            if len(group) == 1 and per_msg <= 1:
                item_id, data = group[0]
                headers = {
                    subjects.H_JOB_ID: job.job_id,
                    subjects.H_ITEM_ID: item_id,
                    subjects.H_ENDPOINT: job.endpoint,
                    subjects.H_MSG_ID: subjects.item_msg_id(job.job_id, item_id),
                }
            else:
                data = _pack(group)
                headers = {
                    subjects.H_JOB_ID: job.job_id,
                    subjects.H_ITEMS: str(len(group)),
                    subjects.H_ENDPOINT: job.endpoint,
                    subjects.H_MSG_ID: subjects.pack_msg_id(job.job_id, [i for i, _ in group]),
                }
            send(data, headers, len(group))
            group.clear()
            size = 0

        for item_id, body in items:
            data = body if isinstance(body, bytes) else msgspec.json.encode(body)
            cost = len(data) + len(item_id) + 32
            if per_msg > 1 and isinstance(body, bytes) and not _is_json(data):
                # Not JSON: alone, in the one-item form, it gets its own 400 result
                # (inside a pack it would spoil the whole message).
                flush_group()
                group.append((item_id, data))
                per_msg, packed = 1, per_msg
                flush_group()
                per_msg = packed
                continue
            if group and (len(group) >= per_msg or size + cost > limit):
                flush_group()
                if len(pending) >= SUBMIT_WINDOW:
                    await settle()
            group.append((item_id, data))
            size += cost
        flush_group()
        await settle()
        return sent

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """Publish with retries: a NATS restart or leader election is waited out (the
        item's message id makes a repeat of a publish whose ack was lost harmless)."""
        try:
            await natsio.retrying(
                lambda: self.js.publish(subject, data, headers=headers, timeout=5.0),
                timeout=max(self.settings.retry_timeout, 120.0),
                what="submit a batch item",
                nc=self.nc,
            )
        except NebulaError:
            raise
        except Exception as e:
            raise Unavailable(f"could not submit a batch item: {e!r}") from e

    async def finish_submitting(self, job: BatchJob) -> BatchJob:
        return await self._set_state(job, JobState.SUBMITTED)

    async def cancel(self, job_id: str) -> BatchJob:
        """Items not yet run end with a `cancelled` error result: every item still gets one."""
        job = await self.get(job_id)
        if job is None:
            raise ModelNotFound(f"no batch job {job_id}", param="job")
        return await self._set_state(job, JobState.CANCELLED)

    async def status(self, job_id: str) -> JobStatus:
        job = await self.get(job_id)
        if job is None:
            raise ModelNotFound(f"no batch job {job_id}", param="job")
        done = await self._count(subjects.RESULT_STREAM, subjects.result_filter(job_id))
        return JobStatus(job=job, done=done, queued=await self.queued(job.model))

    async def queued(self, model: str) -> int:
        """Batch items waiting for ``model`` (all jobs): a work queue allows no second
        consumer on its subjects, so this reads the stream's per-subject count."""
        subject = subjects.job_subject(model)
        info = await self.js.stream_info(subjects.JOB_STREAM, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def _count(self, stream: str, subject: str) -> int:
        """Messages on ``subject``: a throwaway consumer's pending count, no data read."""
        info = await self.js.add_consumer(
            stream,
            ConsumerConfig(
                filter_subject=subject,
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=5.0,
            ),
        )
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(stream, info.name)
        return int(info.num_pending or 0)

    async def results(self, job_id: str, *, follow: bool = True) -> AsyncIterator[Result]:
        """Every stored result of the job (one per item), then new ones as they land
        (``follow``); stop when you have what you need."""
        sub = await self.js.subscribe(
            subjects.result_filter(job_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        # nats-py's next_msg starts a task and a timer for every message: with results
        # already buffered (the common case while collecting), take them off the same
        # queue it reads, keeping its accounting, and wait through it only when empty.
        buffered = sub._pending_queue
        try:
            if not follow:
                # What is stored now, not a second of silence: a fresh job has none.
                info = await sub.consumer_info()
                delivered = info.delivered.consumer_seq if info.delivered else 0
                if not info.num_pending and not delivered and buffered.empty():
                    return
            while True:
                try:
                    if buffered.empty():
                        msg = await sub.next_msg(timeout=1.0)
                    else:
                        msg = buffered.get_nowait()
                        sub._pending_size -= len(msg.data)
                        buffered.task_done()
                except TimeoutError:
                    if not follow:
                        return
                    continue
                except Exception as e:  # nats' own TimeoutError is not the builtin
                    if type(e).__name__ != "TimeoutError":
                        raise
                    if not follow:
                        return
                    continue
                hdrs = msg.headers or {}
                status = hdrs.get(subjects.H_STATUS, "500")
                last = not follow and not msg.metadata.num_pending
                yield Result(
                    item_id=hdrs.get(subjects.H_ITEM_ID)
                    or subjects.item_from_result_subject(msg.subject),
                    status=int(status) if status.isdigit() else 500,
                    body=msg.data,
                )
                if last:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def purge(self, job_id: str) -> None:
        """Drop the job's results and record once they are collected."""
        with contextlib.suppress(Exception):
            await self.js.purge_stream(
                subjects.RESULT_STREAM, subject=subjects.result_filter(job_id)
            )
        with contextlib.suppress(Exception):
            await self._jobs.delete(subjects.job_key(job_id))


__all__ = ["BatchClient", "JobStatus", "NebulaError", "Result"]
