"""The engine worker: pulls jobs for ONE model only when it has a free slot.

Flow control is explicit. The worker keeps JetStream pull requests outstanding
for exactly ``max_concurrency - inflight`` messages, so jobs queue in the broker
(where every worker of the model can take them) and never inside a busy engine.
Each job streams frames to the gateway's reply subject: ``start`` at once, the
first token at once, later tokens batched by count or time, ``keepalive`` while
silent, then ``end`` or ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from nebula import natsio, subjects
from nebula.errors import DeadlineExceeded, EngineError, InvalidRequest, NebulaError, WorkerLost
from nebula.openai_types import SSE_DONE, StreamFlags, sse
from nebula.protocol import Endpoint, FrameKind, WorkerInfo
from nebula.service import Service
from nebula.settings import NatsSettings, WorkerSettings
from workers.engines.base import Engine, Job

log = logging.getLogger(__name__)

PULL_EXPIRES = 5.0  # seconds a pull request lingers in the server
_ACK = b"+ACK"
_NAK = b"-NAK"


class WorkerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(eq=False, slots=True)
class _InFlight:
    request_id: str
    reply: str
    task: asyncio.Task[None] | None = None
    seq: int = 0
    buf: list[bytes] = field(default_factory=list)
    buf_tokens: int = 0
    buf_since: float = 0.0
    last_sent: float = 0.0


class Worker(Service):
    """``async with Worker(...) as w: await w.wait_closed()``."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        nc: Client,
        nats_settings: NatsSettings,
        *,
        node_id: str = "",
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.nc = nc
        self.nats_settings = nats_settings
        self.node_id = node_id or socket.gethostname()
        self.worker_id = settings.worker_id or f"w{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.state = WorkerState.CREATED
        self.model = settings.model
        self._consumer = subjects.req_consumer(self.model)
        self._pull_subject = subjects.pull_next_subject(subjects.REQ_STREAM, self._consumer)
        self._deliver = nc.new_inbox()
        # Outstanding pull requests, oldest first: [expires_at, messages still owed].
        self._pulls: deque[list[float]] = deque()
        self._inflight: dict[str, _InFlight] = {}
        self._subs: list[Subscription] = []
        self._deliver_sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._kv: KeyValue | None = None
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.jobs_started = 0
        self.jobs_cancelled = 0
        self.jobs_expired = 0
        self.peak_inflight = 0
        self._last_repair = 0.0
        self._started_at = time.time()
        self._hdr_base = {subjects.H_WORKER: self.worker_id}

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        js = self.nc.jetstream()
        await natsio.ensure_request_stream(js, self.nats_settings, max_queue=None)
        await self._ensure_consumer()
        self._kv = await natsio.workers_bucket(js, self.nats_settings)
        self._deliver_sub = await self.nc.subscribe(self._deliver, cb=self._on_msg)
        self._subs.append(self._deliver_sub)
        self._subs.append(
            await self.nc.subscribe(subjects.cancel_subject(self.worker_id), cb=self._on_cancel)
        )
        self.state = WorkerState.RUNNING
        await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"{self.worker_id}-heartbeat"),
            asyncio.create_task(self._ticker(), name=f"{self.worker_id}-ticker"),
        ]
        await self._refill()
        log.info("worker %s serving %r", self.worker_id, self.model)

    async def _ensure_consumer(self) -> None:
        js = self.nc.jetstream()
        await js.add_consumer(
            subjects.REQ_STREAM,
            ConsumerConfig(
                durable_name=self._consumer,
                filter_subject=subjects.req_subject(self.model),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                # Workers ack on receipt; a job handed to a worker that died before
                # acking comes back to the queue after this long.
                ack_wait=10.0,
                # No delivery cap: a draining worker NAKs what its last pulls bring,
                # and that must never drop a job. Deadlines bound a job's life instead.
                max_deliver=-1,
                max_waiting=4096,
            ),
        )

    async def close(self) -> None:
        """Stop taking work, let in-flight jobs finish (bounded), cancel the rest."""
        if self.state in (WorkerState.DRAINING, WorkerState.STOPPED):
            await self._closed.wait()
            return
        self.state = WorkerState.DRAINING
        # Stop taking work first. The server drops open pull requests whose inbox has
        # no interest; draining the subscription (unsubscribe + round trip) hands back
        # (NAKs) every job it sent before that, so none waits out ack_wait in a dead inbox.
        if self._deliver_sub is not None:
            with contextlib.suppress(Exception):
                await self._deliver_sub.drain()
        with contextlib.suppress(Exception):
            await self._heartbeat_once()
        if self._inflight:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        for job in list(self._inflight.values()):
            if job.task is not None:
                job.task.cancel()
                await self._send_error(job, WorkerLost("worker stopped before finishing"))
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(subjects.worker_key(self.model, self.worker_id))
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        self.state = WorkerState.STOPPED
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # --- flow control ----------------------------------------------------------

    def _owed(self) -> int:
        return int(sum(p[1] for p in self._pulls))

    async def _refill(self) -> None:
        if self.state is not WorkerState.RUNNING or not self.nc.is_connected:
            return
        want = self.settings.max_concurrency - len(self._inflight) - self._owed()
        if want <= 0:
            return
        self._pulls.append([time.monotonic() + PULL_EXPIRES, float(want)])
        req = b'{"batch":%d,"expires":%d}' % (want, int(PULL_EXPIRES * 1e9))
        await self.nc.publish(self._pull_subject, req, reply=self._deliver)

    def _pull_satisfied(self, n: float = 1.0) -> None:
        if self._pulls:
            self._pulls[0][1] -= n
            if self._pulls[0][1] <= 0:
                self._pulls.popleft()

    async def _on_msg(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        status = hdrs.get("Status")
        if status is not None:
            await self._on_status(status, hdrs)
            return
        self._pull_satisfied()
        if self.state is not WorkerState.RUNNING:
            await self.nc.publish(msg.reply, _NAK)  # back to the queue for another worker
            return
        await self.nc.publish(msg.reply, _ACK)
        rid = hdrs.get(subjects.H_REQUEST_ID) or uuid.uuid4().hex
        reply = hdrs.get(subjects.H_REPLY, "")
        job = _InFlight(request_id=rid, reply=reply, last_sent=time.monotonic())
        self._inflight[rid] = job
        self.peak_inflight = max(self.peak_inflight, len(self._inflight))
        self._idle.clear()
        job.task = asyncio.create_task(self._run(job, msg))

    async def _on_status(self, status: str, hdrs: dict[str, str]) -> None:
        if status == "100":  # idle heartbeat
            return
        if status in ("408", "409", "503"):
            # The oldest pull request ended (expired, refused, or nobody answered it):
            # forget what it still owed.
            if self._pulls:
                self._pulls.popleft()
            if status == "503" or "Consumer Deleted" in hdrs.get("Description", ""):
                await self._repair()
        await self._refill()

    async def _repair(self) -> None:
        """Re-create the stream and consumer (memory storage dies with a NATS restart)."""
        now = time.monotonic()
        if now - self._last_repair < 1.0:
            return
        self._last_repair = now
        try:
            js = self.nc.jetstream()
            await natsio.ensure_request_stream(js, self.nats_settings, max_queue=None)
            await self._ensure_consumer()
        except Exception as e:
            log.warning("could not re-create the queue for %r: %s", self.model, e)

    async def _on_cancel(self, msg: Msg) -> None:
        job = self._inflight.get(msg.data.decode())
        if job is not None and job.task is not None:
            self.jobs_cancelled += 1
            job.task.cancel()
            with contextlib.suppress(Exception):
                await self.engine.abort(job.request_id)

    # --- running a job -----------------------------------------------------------

    async def _run(self, job: _InFlight, msg: Msg) -> None:
        hdrs = msg.headers or {}
        try:
            deadline = float(hdrs.get(subjects.H_DEADLINE, "0") or 0)
            if deadline and deadline < time.time():
                self.jobs_expired += 1
                await self._send_error(
                    job, DeadlineExceeded("request waited in queue past its deadline")
                )
                return
            self.jobs_started += 1
            await self._frame(job, FrameKind.START, b"")
            endpoint = Endpoint(hdrs.get(subjects.H_ENDPOINT, Endpoint.CHAT.value))
            try:
                flags = msgspec.json.decode(msg.data, type=StreamFlags)
            except msgspec.DecodeError as e:
                raise InvalidRequest(f"job body is not a valid request: {e}") from e
            work = Job(
                request_id=job.request_id,
                model=self.model,
                endpoint=endpoint,
                body=msg.data,
                stream=flags.stream,
                include_usage=flags.include_usage,
            )
            if work.stream:
                await self._stream(job, work)
            else:
                body = b""
                async for out in self.engine.generate(work):
                    body = out.chunk
                await self._frame(job, FrameKind.END, body)
        except asyncio.CancelledError:
            pass  # cancelled by the client or by close(): nobody waits for frames
        except NebulaError as e:
            await self._send_error(job, e)
        except Exception as e:
            log.exception("job %s failed", job.request_id)
            await self._send_error(job, EngineError(f"engine failed: {e!r}"))
        finally:
            self._inflight.pop(job.request_id, None)
            if not self._inflight:
                self._idle.set()
            await self._refill()

    async def _stream(self, job: _InFlight, work: Job) -> None:
        first = True
        limit = self.settings.batch_tokens
        async for out in self.engine.generate(work):
            if not out.chunk:
                continue
            job.buf.append(sse(out.chunk))
            if not job.buf_tokens:
                job.buf_since = time.monotonic()
            job.buf_tokens += max(out.tokens, 1)
            if first and out.tokens:  # the first token goes out at once
                first = False
                await self._flush(job)
            elif job.buf_tokens >= limit:
                await self._flush(job)
        job.buf.append(SSE_DONE)
        body = b"".join(job.buf)
        job.buf.clear()
        job.buf_tokens = 0
        await self._frame(job, FrameKind.END, body)

    async def _flush(self, job: _InFlight) -> None:
        if not job.buf:
            return
        body = b"".join(job.buf)
        job.buf.clear()
        job.buf_tokens = 0
        await self._frame(job, FrameKind.DATA, body)

    async def _frame(self, job: _InFlight, kind: FrameKind, body: bytes) -> None:
        if not job.reply:
            return
        job.seq += 1
        job.last_sent = time.monotonic()
        headers = {
            subjects.H_KIND: kind.value,
            subjects.H_SEQ: str(job.seq),
            subjects.H_WORKER: self.worker_id,
        }
        await self.nc.publish(job.reply, body, headers=headers)

    async def _send_error(self, job: _InFlight, err: NebulaError) -> None:
        if not job.reply:
            return
        job.seq += 1
        headers = {
            subjects.H_KIND: FrameKind.ERROR.value,
            subjects.H_SEQ: str(job.seq),
            subjects.H_WORKER: self.worker_id,
            subjects.H_STATUS: str(err.status),
        }
        with contextlib.suppress(Exception):
            await self.nc.publish(job.reply, err.to_json(), headers=headers)

    # --- background loops ----------------------------------------------------------

    async def _ticker(self) -> None:
        """Flush batched tokens older than batch_ms, keepalive silent jobs, expire lost pulls."""
        period = max(self.settings.batch_ms / 1000, 0.002)
        keepalive = self.settings.keepalive_interval
        batch_s = self.settings.batch_ms / 1000
        last_pull_check = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for job in list(self._inflight.values()):
                if job.buf_tokens and now - job.buf_since >= batch_s:
                    await self._flush(job)
                elif now - job.last_sent >= keepalive:
                    await self._frame(job, FrameKind.KEEPALIVE, b"")
            if now - last_pull_check >= 1.0:
                last_pull_check = now
                # A pull whose 408 we never saw (NATS restarted) owes nothing any more.
                while self._pulls and self._pulls[0][0] + 2.0 < now:
                    self._pulls.popleft()
                await self._refill()

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.model,
            engine=self.engine.kind,
            owned_by=self.engine.owned_by,
            node_id=self.node_id,
            max_concurrency=self.settings.max_concurrency,
            inflight=len(self._inflight),
            started_at=self._started_at,
            ready=self.state is WorkerState.RUNNING,
            draining=self.state is WorkerState.DRAINING,
        )

    async def _heartbeat_once(self) -> None:
        if self._kv is not None:
            await self._kv.put(
                subjects.worker_key(self.model, self.worker_id), msgspec.json.encode(self.info())
            )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self._heartbeat_once()
            except Exception as e:  # NATS down: keep serving what we have, beat again later
                log.debug("heartbeat failed: %s", e)

    async def on_reconnect(self) -> None:
        """Pull requests die with the connection: forget them and ask again."""
        self._pulls.clear()
        self._last_repair = 0.0
        await self._repair()
        await self._refill()
