"""Batch-job intake: a worker's items from the job stream, run and stored as results.

Batch items have their own pull inbox, pulls and slots, apart from interactive jobs:
they are pulled only while interactive work leaves a slot free, in short pulls, so a
rise in interactive load stops batch intake within a second. A job message holds one
item (the documented raw-NATS form) or many (``Nebula-Items``: packed); every item
gets a result of its own on its own subject, stored before the message is acked, so
a crash in between reruns the message and the rerun's results replace nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from nebula import natsio, subjects
from nebula.errors import Conflict, EngineError, InvalidRequest, NebulaError
from nebula.protocol import BatchEntry, BatchJob, BatchPack, Endpoint, JobState
from workers.engines.base import Job
from workers.results import ResultPublisher

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger(__name__)

BATCH_PULL_EXPIRES = 1.0  # short: batch intake must stop soon after interactive load rises
_ACK = b"+ACK"
_NAK = b"-NAK"
_IN_PROGRESS = b"+WPI"
_NAK_SOON = b'-NAK {"delay": 1000000000}'  # redeliver after a second
_ENDPOINTS = {e.value: e for e in Endpoint}


def _stream_seq(msg: Msg) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return 0


class BatchIntake:
    """The batch side of one :class:`~workers.worker.Worker`, which owns it:
    ``start()`` with the worker, ``refill()`` whenever a slot may be free,
    ``drain()`` when the worker closes."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.nc = worker.nc
        self.settings = worker.settings
        self.engine = worker.engine
        self._deliver = self.nc.new_inbox()
        self._sub: Subscription | None = None
        self._pulls: deque[list[float]] = deque()
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._pull_subject = subjects.pull_next_subject(
            subjects.JOB_STREAM, subjects.job_consumer(worker.model)
        )
        self._jobs_kv: KeyValue | None = None
        # Batch items held at once: an engine that batches (hf) asks for more than its
        # concurrency, so its passes can pick texts of similar length.
        self.slots = max(int(getattr(self.engine, "batch_slots", 0)), self.settings.max_concurrency)
        self._held_items = 0  # items in the batch messages held now
        self._items_per_msg = 1.0  # recent items per batch message (packed ones hold many)
        self._results = ResultPublisher(self.nc, timeout=10.0)
        self._sem = asyncio.Semaphore(self.slots)
        self._job_states: dict[str, tuple[float, asyncio.Future[str]]] = {}
        self.items_done = 0

    async def start(self) -> None:
        js = self.nc.jetstream()
        await natsio.ensure_batch_streams(js, self.worker.nats_settings)
        await self._ensure_job_consumer()
        self._jobs_kv = await natsio.jobs_bucket(js, self.worker.nats_settings)
        await self._results.start()
        self._sub = await self.nc.subscribe(self._deliver, cb=self._on_item)

    async def _ensure_job_consumer(self) -> None:
        await self.nc.jetstream().add_consumer(
            subjects.JOB_STREAM,
            ConsumerConfig(
                durable_name=subjects.job_consumer(self.worker.model),
                filter_subject=subjects.job_subject(self.worker.model),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                # Acked only once its result is stored: a worker dying mid-item hands
                # it back after this long, and the rerun's result replaces nothing.
                ack_wait=self.settings.batch_ack_wait,
                max_deliver=-1,
                max_waiting=4096,
            ),
        )

    async def stop_taking(self) -> None:
        """Stop taking work: draining the subscription hands back what it brought."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.drain()

    async def drain(self) -> None:
        """Finish the items held (bounded), then stop publishing results."""
        if self._inflight:
            # Items are short and their results are keyed: finish them, bounded.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.drain_timeout):
                    await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self._results.close()

    def expire(self, now: float) -> None:
        """A pull whose 408 we never saw (NATS restarted) owes nothing any more; result
        acks overdue fail."""
        while self._pulls and self._pulls[0][0] + 2.0 < now:
            self._pulls.popleft()
        self._results.expire(now)

    def on_reconnect(self) -> None:
        """Pull requests and result acks in flight die with the connection."""
        self._pulls.clear()
        self._results.fail_all("NATS reconnected: result acks in flight are lost")

    async def refill(self) -> None:
        """Batch items only while interactive work leaves a slot free: then no interactive
        job waits for this worker (its open pulls would have brought it). Short pulls, so
        a rise in interactive load stops batch intake within a second."""
        if self._sub is None or self.worker.inflight >= self.settings.max_concurrency:
            return
        owed = int(sum(p[1] for p in self._pulls))
        # Counted in items and in texts the engine has waiting: items of many texts must
        # not pile up past their ack_wait inside the engine. A pull asks for messages,
        # so free item slots become messages by the recent items per message (packed).
        per_msg = max(self._items_per_msg, 1.0)
        slots = max(int(self.slots / per_msg), 1)
        held = max(self._held_items, self.engine.load().waiting) / per_msg
        want = int(slots - held) - owed
        # One pull per few free slots, not one per finished item (each pull is a message
        # to the server and back); with nothing owed, any free slot is worth a pull.
        if want <= 0 or (owed and want < slots // 16):
            return
        self._pulls.append([time.monotonic() + BATCH_PULL_EXPIRES, float(want)])
        req = b'{"batch":%d,"expires":%d}' % (want, int(BATCH_PULL_EXPIRES * 1e9))
        await self.nc.publish(self._pull_subject, req, reply=self._deliver)

    async def _on_item(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        if not msg.reply.startswith(subjects.JS_ACK_PREFIX):
            if hdrs.get("Status") in ("408", "409", "503") and self._pulls:
                self._pulls.popleft()
            return  # the ticker asks again
        if self._pulls:
            self._pulls[0][1] -= 1
            if self._pulls[0][1] <= 0:
                self._pulls.popleft()
        if not self.worker.taking_work:
            await self.nc.publish(msg.reply, _NAK)
            return
        job_id, item_id = hdrs.get(subjects.H_JOB_ID, ""), hdrs.get(subjects.H_ITEM_ID, "")
        count = hdrs.get(subjects.H_ITEMS)
        if not job_id or (not item_id and count is None):
            await self.nc.publish(msg.reply, _ACK)
            await self.worker.dead_letter(
                msg, "batch item needs Nebula-Job-Id and Nebula-Item-Id (or Nebula-Items)"
            )
            return
        if count is not None:  # packed: many items, one result each
            n = int(count) if count.isdigit() and int(count) > 0 else 1
            key = (job_id, f"#{_stream_seq(msg)}")
        else:
            n, key = 1, (job_id, item_id)
        if key in self._inflight:
            return  # a redelivery of a message running here: its results are on the way
        self._items_per_msg += (n - self._items_per_msg) * 0.2
        self._held_items += n
        run = self._run_pack(msg, job_id, n) if count is not None else self._run_item(msg, job_id)
        self._inflight[key] = asyncio.create_task(self._held(run, key, n))

    async def _held(self, run: Coroutine[Any, Any, None], key: tuple[str, str], n: int) -> None:
        try:
            await run
        except asyncio.CancelledError:
            pass  # not acked: JetStream hands it to a worker again
        except Exception as e:
            log.warning(
                "batch message of job %s: results not stored (%s); it will rerun", key[0], e
            )
        finally:
            self._inflight.pop(key, None)
            self._held_items -= n
            await self.refill()

    async def _job_state(self, job_id: str) -> str:
        """The job's state from KV, cached for a second: one read per job, not per item,
        even when a whole pull's worth of items asks at once (they share the read)."""
        now = time.monotonic()
        cached = self._job_states.get(job_id)
        if cached is None or now - cached[0] >= 1.0:
            if len(self._job_states) > 1024:
                self._job_states.clear()
            cached = (now, asyncio.ensure_future(self._read_job_state(job_id)))
            self._job_states[job_id] = cached
        if cached[1].done():  # the common case: no shield (a future and a callback) per item
            return cached[1].result()
        return await asyncio.shield(cached[1])

    async def _read_job_state(self, job_id: str) -> str:
        if self._jobs_kv is not None:
            with contextlib.suppress(Exception):
                entry = await self._jobs_kv.get(subjects.job_key(job_id))
                if entry.value:
                    return msgspec.json.decode(entry.value, type=BatchJob).state.value
        return ""

    async def _item_check(self, msg: Msg, job_id: str) -> Endpoint | NebulaError:
        """What a job message's items run as, or the error every one of them gets."""
        try:
            delivered = msg.metadata.num_delivered
        except Exception:
            delivered = 1
        if delivered > self.settings.max_deliver:
            return EngineError(f"the item was delivered {delivered} times without a result")
        if await self._job_state(job_id) == JobState.CANCELLED.value:
            return Conflict(f"job {job_id} was cancelled")
        endpoint = _ENDPOINTS.get((msg.headers or {}).get(subjects.H_ENDPOINT) or "embedding")
        if endpoint is None:
            return InvalidRequest(f"bad {subjects.H_ENDPOINT} header", param=subjects.H_ENDPOINT)
        return endpoint

    async def _item_result(
        self, job_id: str, item_id: str, body: bytes, endpoint: Endpoint | NebulaError
    ) -> tuple[bytes, int]:
        """One item's answer (an OpenAI body) and its status; failures are results too."""
        if isinstance(endpoint, NebulaError):
            return endpoint.to_json(), endpoint.status
        async with self._sem:  # a pack holds no more items in the engine than slots
            return await self._answer(job_id, item_id, body, endpoint)

    async def _answer(
        self, job_id: str, item_id: str, body: bytes, endpoint: Endpoint
    ) -> tuple[bytes, int]:
        work = Job(
            request_id=f"{job_id}/{item_id}",
            model=self.worker.model,
            endpoint=endpoint,
            body=body,
            stream=False,
            include_usage=False,
            priority=1,
        )
        try:
            out_body = b""
            async for out in self.engine.generate(work):
                self.worker.progressed()
                out_body = out.chunk
            return out_body, 200
        except NebulaError as e:
            return e.to_json(), e.status
        except Exception as e:
            log.exception("batch item %s/%s failed", job_id, item_id)
            return EngineError(f"engine failed: {e!r}").to_json(), 500

    async def _store(self, job_id: str, answers: list[tuple[str, bytes, int]], msg: Msg) -> None:
        """Results stored first, the message acked after: a crash in between reruns its
        items, and a rerun's result lands on the same subject, where the stream keeps
        one. All publishes go out at once; the ack waits for all of their acks."""
        futs = []
        for item_id, body, status in answers:
            headers = {
                subjects.H_JOB_ID: job_id,
                subjects.H_ITEM_ID: item_id,
                subjects.H_STATUS: str(status),
                subjects.H_WORKER: self.worker.worker_id,
            }
            futs.append(
                await self._results.publish(subjects.result_subject(job_id, item_id), body, headers)
            )
        failed = [r for r in await asyncio.gather(*futs, return_exceptions=True) if r is not None]
        if failed:
            # Handed out again soon (not after ack_wait); their reruns replace nothing.
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, _NAK_SOON)
            raise failed[0] if isinstance(failed[0], Exception) else RuntimeError(failed[0])
        await self.nc.publish(msg.reply, _ACK)
        self.items_done += len(answers)

    async def _run_item(self, msg: Msg, job_id: str) -> None:
        """A one-item message (the documented raw-NATS form)."""
        item_id = (msg.headers or {})[subjects.H_ITEM_ID]
        endpoint = await self._item_check(msg, job_id)
        body, status = await self._item_result(job_id, item_id, msg.data, endpoint)
        await self._store(job_id, [(item_id, body, status)], msg)

    async def _in_progress(self, msg: Msg) -> None:
        """A pack of long items (chat) may outlast ack_wait: tell JetStream it is being
        worked on, so it is not handed to a second worker meanwhile."""
        while True:
            await asyncio.sleep(self.settings.batch_ack_wait / 3)
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, _IN_PROGRESS)

    async def _run_pack(self, msg: Msg, job_id: str, n: int) -> None:
        """A packed message: its items run at once (the engine batches them together)."""
        try:
            pack = msgspec.json.decode(msg.data, type=BatchPack)
            if not pack.items or any(not e.id for e in pack.items):
                raise msgspec.ValidationError("every item needs a non-empty id")
        except (
            msgspec.DecodeError,
            msgspec.ValidationError,
            UnicodeDecodeError,
            RecursionError,
        ) as e:
            await self.nc.publish(msg.reply, _ACK)
            await self.worker.dead_letter(
                msg, f'packed batch message must be {{"items": [{{"id", "body"}}, ...]}}: {e}'
            )
            return
        entries = list({e.id: e for e in pack.items}.values())  # an id twice: one result
        endpoint = await self._item_check(msg, job_id)
        progress = asyncio.create_task(self._in_progress(msg))
        try:
            answers = await self._pack_results(job_id, entries, endpoint)
        finally:
            progress.cancel()
        await self._store(
            job_id, [(e.id, b, st) for e, (b, st) in zip(entries, answers, strict=True)], msg
        )

    async def _pack_results(
        self, job_id: str, entries: list[BatchEntry], endpoint: Endpoint | NebulaError
    ) -> list[tuple[bytes, int]]:
        many = getattr(self.engine, "embed_bodies", None)
        if endpoint is not Endpoint.EMBEDDING or many is None:
            return list(
                await asyncio.gather(
                    *(self._item_result(job_id, e.id, bytes(e.body), endpoint) for e in entries)
                )
            )
        # An engine that batches embeddings takes the whole pack as one submission.
        try:
            answers: list[tuple[bytes, int]] = await many(
                self.worker.model, [bytes(e.body) for e in entries]
            )
        except NebulaError as e:
            return [(e.to_json(), e.status)] * len(entries)
        except Exception as e:
            log.exception("batch pack of job %s failed", job_id)
            err = EngineError(f"engine failed: {e!r}")
            return [(err.to_json(), err.status)] * len(entries)
        self.worker.progressed()
        return answers
