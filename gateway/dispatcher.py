"""Jobs out, frames back.

The gateway holds ONE wildcard subscription on its reply prefix and hands each
frame to the waiting call by request id; there is never a subscription per
request. Every wait is bounded: the dispatch deadline until a worker starts the
job, the keepalive timeout once it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.js.errors import APIError

from gateway.metrics import GatewayMetrics
from gateway.migration import Migration
from gateway.registry import ModelRegistry
from nebula import natsio, subjects
from nebula.errors import (
    DeadlineExceeded,
    EngineError,
    NebulaError,
    NoReplica,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    WorkerLost,
    error_from_wire,
)
from nebula.protocol import Endpoint, FrameKind
from nebula.settings import GatewaySettings, NatsSettings

log = logging.getLogger(__name__)

# JetStream refusing a publish to a full stream (discard new): messages, bytes.
_JS_QUEUE_FULL = (10077, 10078, 10047, 10048)
_JS_TOO_LARGE = 10054  # "message size exceeds maximum allowed"
_START = FrameKind.START.value
_DATA = FrameKind.DATA.value
_END = FrameKind.END.value
_ERROR = FrameKind.ERROR.value
_KEEPALIVE = FrameKind.KEEPALIVE.value
_FAILURE = "failure"  # Call.tail after fail(): the next read raises at once
# Frames after which frames() yields, returns or raises (a frame without a kind is data).
_ANSWER_KINDS = frozenset({_DATA, _END, _ERROR, _FAILURE, None})


# A request runs at most this many attempts (the first, and one transparent retry).
MAX_ATTEMPTS = 2
# Orphan frames (for requests nobody here waits for) already answered with a cancel.
_ORPHANS_REMEMBERED = 4096


class _LostFrames(Exception):
    """A gap in a stream's frame sequence (frames lost while NATS reconnected)."""


class Call:
    """One request in flight: frames of its current attempt arrive on ``queue``."""

    __slots__ = (
        "attempt",
        "body",
        "buffered",
        "consumed",
        "deadline",
        "delivered",
        "dispatcher",
        "done",
        "endpoint",
        "failure",
        "granted",
        "held",
        "last_seq",
        "migration",
        "model",
        "published_at",
        "queue",
        "raw",
        "request_id",
        "seq",
        "started_at",
        "tail",
        "usage",
        "worker_id",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        model: str,
        endpoint: Endpoint,
        body: bytes,
        deadline: float,
        request_id: str,
    ) -> None:
        self.dispatcher = dispatcher
        self.request_id = request_id
        self.model = model
        self.endpoint = endpoint
        self.body = body
        self.deadline = deadline
        # None is the wake-up for ``failure`` (gateway shutdown, flow-control breach).
        self.queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self.tail: str | None = None  # kind of the newest frame queued ("failure": fail())
        self.worker_id: str | None = None
        self.attempt = 0
        self.seq = 0  # stream sequence of the queued job, to withdraw it
        self.last_seq = 0  # frame sequence of the current attempt, to detect lost frames
        self.delivered = False  # has any answer byte reached the client?
        self.done = False
        self.failure: NebulaError | None = None
        self.buffered = 0  # frame bytes received and not yet taken by the relay
        self.consumed = 0  # data bytes written to the client (flow-control credit)
        self.granted = 0  # ``consumed`` as last reported to the worker
        self.published_at = 0.0  # perf_counter at the last publish, for time in queue
        self.started_at = 0.0  # perf_counter when a worker started the job
        self.usage: str | None = None  # "prompt completion" from the end frame
        self.migration: Migration | None = None
        self.raw = 0  # size of the last frame as the worker sent it (before a rewrite)
        # A data/end frame that also marked the start (no start frame came before it):
        # frames() takes it first, ahead of frames queued behind it.
        self.held: Msg | None = None

    def ready(self) -> bool:
        """frames() would yield at once: the newest frame queued is data, end or error
        (keepalives before it are skipped without waiting). Not for a migrated stream,
        whose relay may drop a frame and wait for the next."""
        if self.migration is not None:
            return False
        return self.held is not None or (self.tail in _ANSWER_KINDS and not self.queue.empty())

    async def _next(self, timeout: float) -> Msg:
        held = self.held
        if held is not None:
            self.held = None
            return held  # counted and sequence-checked when it first arrived
        msg: Msg | None
        if self.queue.empty():
            async with asyncio.timeout(timeout):
                msg = await self.queue.get()
        else:
            msg = self.queue.get_nowait()  # no timer for a frame already here
        if msg is None:
            assert self.failure is not None
            raise self.failure
        self.buffered -= len(msg.data)
        hdrs = msg.headers or {}
        seq = hdrs.get(subjects.H_SEQ)
        if seq is not None and seq.isdigit():
            n = int(seq)
            # Frames of one attempt are numbered from 1; a gap means some were lost.
            if n != self.last_seq + 1 and (self.worker_id is not None or n > 2):
                raise _LostFrames(f"frame {n} after {self.last_seq}")
            self.last_seq = n
        return msg

    async def wait_started(self) -> None:
        """Until a worker sends ``start``; 503/504 when none does before the deadline."""
        d = self.dispatcher
        silent_taker = False
        while True:
            remaining = self.deadline - time.time() + 0.5  # the worker's own 504 wins ties
            # Look every keepalive period whether a worker took the job and froze.
            wait = min(remaining, d.settings.keepalive_timeout)
            try:
                msg = await self._next(max(wait, 0.0))
            except TimeoutError:
                if wait < remaining:
                    taken = await d.taken(self) if self.attempt < MAX_ATTEMPTS else None
                    # Handed to a worker that never acked it (stopped, cut off from
                    # NATS), or acked by one that has sent nothing for two periods (it
                    # froze before its first frame; a live one sends start within
                    # start_hold_ms, keepalives every second, and one period could end
                    # just after it took the job): take it back, not wait out ack_wait.
                    if taken == "queued" or (taken == "acked" and silent_taker):
                        await d.withdraw(self)
                        await self._retry("it was taken and nothing came back")
                        return
                    silent_taker = taken == "acked"
                    continue
                await d.withdraw(self)
                if not d.registry.live_workers(self.model):
                    raise NoReplica(
                        f"model `{self.model}` has no ready replica to take the request",
                        param="model",
                    ) from None
                raise DeadlineExceeded(
                    f"request for `{self.model}` waited {d.settings.dispatch_timeout:.0f}s "
                    "in the queue without a free worker",
                    retry_after=d.settings.retry_after,
                ) from None
            except _LostFrames:
                await self._retry("its first frames were lost")
                return
            hdrs = msg.headers or {}
            kind = hdrs.get(subjects.H_KIND)
            # A start, or an answer frame first (an error included): a lazy start (the
            # worker skipped start for a fast first frame), or a start lost in a reconnect.
            self.started_at = time.perf_counter()
            if kind == _ERROR:
                raise _wire_error(msg)
            self.worker_id = hdrs.get(subjects.H_WORKER) or "?"
            if kind != _START and kind != _KEEPALIVE:
                self.held = msg  # data/end: frames() takes it next, before any queued
            return

    async def _retry(self, why: str) -> None:
        """Run the request again elsewhere, once, if nothing reached the client yet;
        or, with migration on, continue a started stream on another replica."""
        continuation = None
        if self.delivered and self.migration is not None:
            continuation = self.migration.continuation()
        if continuation is None and (self.delivered or self.attempt >= MAX_ATTEMPTS):
            raise WorkerLost(
                f"worker {self.worker_id} serving `{self.model}`: {why}; "
                "the answer cannot be completed"
            )
        log.warning(
            "request %s attempt %d: %s; %s",
            self.request_id,
            self.attempt,
            why,
            "continuing it on another replica" if continuation else "queueing it again",
        )
        self.dispatcher.metrics.count_requeued(self.model)
        # Stop the old attempt first: a worker that comes back must not finish it too.
        await self.dispatcher.cancel_attempt(self)
        if continuation is not None:
            self.body = continuation
            self.dispatcher.migrations += 1
        self.worker_id = None
        self.last_seq = 0
        self.held = None
        self.deadline = time.time() + self.dispatcher.settings.dispatch_timeout
        await self.dispatcher.publish(self)
        await self.wait_started()

    async def frames(self) -> AsyncIterator[tuple[str, bytes]]:
        """(kind, body) of data/end frames after start, retrying once on a silent worker."""
        timeout = self.dispatcher.settings.keepalive_timeout
        while True:
            try:
                msg = await self._next(timeout)
            except TimeoutError:
                await self._retry(f"went silent for {timeout:g}s")
                continue
            except _LostFrames as e:
                await self._retry(f"frames were lost ({e})")
                continue
            kind = msg.headers.get(subjects.H_KIND) if msg.headers else None
            if kind == _KEEPALIVE or kind == _START:
                continue
            if kind == _ERROR:
                self.done = True
                raise _wire_error(msg)
            data = msg.data
            self.raw = len(data)
            if self.migration is not None:
                data = self.migration.relay(data)
                if not data and kind != _END:
                    await self.written(0)  # credit for what was dropped
                    continue
            if kind == _END:
                self.done = True
                self.usage = msg.headers.get(subjects.H_USAGE) if msg.headers else None
                yield kind, data
                return
            yield kind or _DATA, data

    async def written(self, n: int) -> None:
        """``n`` answer bytes reached the client: grant the worker that much credit
        (as the worker counted them: a migrated stream's frames are rewritten)."""
        self.consumed += self.raw if self.migration is not None else n
        window = self.dispatcher.settings.stream_window
        if self.worker_id is not None and self.consumed - self.granted >= window // 4:
            self.granted = self.consumed
            await self.dispatcher.credit(self)

    def fail(self, err: NebulaError) -> None:
        """End the wait of whoever reads this call with ``err``."""
        if self.failure is None:
            self.failure = err
            self.queue.put_nowait(None)
            self.tail = _FAILURE

    async def cancel(self) -> None:
        """Nobody wants the answer: withdraw the queued job or stop the worker running it.

        If a worker took the job before the withdrawal, its frames arrive for a request
        nobody waits for, and the dispatcher cancels that attempt then (see _on_reply).
        """
        if self.done:
            return
        self.done = True
        if self.worker_id is not None:
            await self.dispatcher.cancel_attempt(self)
        else:
            await self.dispatcher.withdraw(self)

    def close(self) -> None:
        self.dispatcher.forget(self)


def _wire_error(msg: Msg) -> NebulaError:
    status = (msg.headers or {}).get(subjects.H_STATUS, "500")
    return error_from_wire(int(status) if status.isdigit() else 500, msg.data)


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        settings: GatewaySettings,
        nats_settings: NatsSettings,
        registry: ModelRegistry,
        gateway_id: str,
        metrics: GatewayMetrics,
    ) -> None:
        self.nc = nc
        self.metrics = metrics
        self.js = nc.jetstream()
        self.settings = settings
        self.nats_settings = nats_settings
        self.registry = registry
        self.gateway_id = gateway_id
        self.calls: dict[str, Call] = {}
        self._prefix_len = len(subjects.reply_prefix(gateway_id)) + 1
        self._sub: Subscription | None = None
        self._orphans: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()
        # Guard against a worker that ignores flow control: past this, the stream fails.
        self._max_buffered = 4 * settings.stream_window + (1 << 20)
        self.migrations = 0  # streams continued on another replica

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            subjects.reply_wildcard(self.gateway_id), cb=self._on_reply, pending_msgs_limit=-1
        )

    async def ensure_stream(self, model: str) -> None:
        spec = self.registry.spec(model)
        await natsio.ensure_request_stream(self.js, self.nats_settings, model, spec)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def forget(self, call: Call) -> None:
        self.calls.pop(call.request_id, None)
        if not self.calls:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight, False if that takes longer than ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def fail_all(self, err: NebulaError) -> None:
        for call in list(self.calls.values()):
            call.fail(err)

    async def _on_reply(self, msg: Msg) -> None:
        rid = msg.subject[self._prefix_len :]
        call = self.calls.get(rid)
        hdrs = msg.headers or {}
        attempt = hdrs.get(subjects.H_ATTEMPT)
        if call is not None and (attempt is None or attempt == str(call.attempt)):
            call.buffered += len(msg.data)
            call.queue.put_nowait(msg)
            call.tail = hdrs.get(subjects.H_KIND)
            if call.buffered > self._max_buffered:
                call.fail(EngineError("the worker sent past its flow-control window"))
            return
        # Nobody here waits for this attempt (the client left, the job was withdrawn
        # after a worker took it, or it was re-queued): stop it where it runs.
        worker = hdrs.get(subjects.H_WORKER)
        if worker and hdrs.get(subjects.H_KIND) in (_START, _DATA, _KEEPALIVE):
            await self._cancel(worker, rid, attempt or "")

    async def _cancel(self, worker: str, rid: str, attempt: str) -> None:
        key = (worker, rid, attempt)
        if key in self._orphans:
            return
        self._orphans[key] = None
        if len(self._orphans) > _ORPHANS_REMEMBERED:
            self._orphans.popitem(last=False)
        body = f"{rid} {attempt}".strip().encode()
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.cancel_subject(worker), body)

    async def cancel_attempt(self, call: Call) -> None:
        if call.worker_id is not None:
            await self._cancel(call.worker_id, call.request_id, str(call.attempt))

    async def credit(self, call: Call) -> None:
        if call.worker_id is None:
            return
        body = f"{call.request_id} {call.attempt} {call.consumed}".encode()
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.credit_subject(call.worker_id), body)

    async def submit(self, model: str, endpoint: Endpoint, body: bytes, request_id: str) -> Call:
        deadline = time.time() + self.settings.dispatch_timeout
        if request_id in self.calls:  # a client reusing its id for concurrent requests
            request_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        call = Call(self, model, endpoint, body, deadline, request_id)
        spec = self.registry.spec(model)
        if spec is not None and spec.migrate:
            call.migration = Migration.for_request(endpoint, body, spec.migrate)
        self.calls[call.request_id] = call
        self._idle.clear()
        try:
            await self.publish(call)
        except BaseException:
            call.close()
            raise
        return call

    async def publish(self, call: Call) -> None:
        call.attempt += 1
        headers = {
            subjects.H_REQUEST_ID: call.request_id,
            subjects.H_REPLY: subjects.reply_subject(self.gateway_id, call.request_id),
            subjects.H_DEADLINE: f"{call.deadline:.3f}",
            subjects.H_ENDPOINT: call.endpoint.value,
            subjects.H_ATTEMPT: str(call.attempt),
            subjects.H_WINDOW: str(self.settings.stream_window),
            subjects.H_SILENCE: f"{self.settings.keepalive_timeout:g}",
            subjects.H_START: subjects.START_LAZY,  # wait_started takes any first frame
        }
        subject = subjects.req_subject(call.model)
        headers[subjects.H_MSG_ID] = f"{call.request_id}.{call.attempt}"
        if not self.nc.is_connected and not await self._reconnected(call):
            # Fail fast while NATS is away: the client can retry, nothing waits blind.
            raise Unavailable(
                "the message broker is unreachable; retry shortly",
                retry_after=self.settings.retry_after,
            )
        repaired = False

        async def once() -> None:
            nonlocal repaired
            try:
                call.published_at = time.perf_counter()
                ack = await self.js.publish(subject, call.body, headers=headers, timeout=2.0)
            except NoRespondersError:
                # The model's memory stream is gone (its server restarted) or was never
                # made (a worker run by hand not started yet): make it, once.
                if repaired:
                    raise
                repaired = True
                await self.ensure_stream(call.model)
                ack = await self.js.publish(subject, call.body, headers=headers, timeout=2.0)
            call.seq = ack.seq
            self.metrics.count_published(call.model)

        # Leader elections (a server of a cluster died) answer with timeouts and 503s
        # for a few seconds: ride through them, within the request's own deadline.
        budget = min(self.nats_settings.retry_timeout, max(call.deadline - time.time(), 0.5))
        try:
            await natsio.retrying(once, timeout=budget, what="queue a request", nc=self.nc)
        except APIError as e:
            if e.err_code in _JS_QUEUE_FULL:
                raise QueueFull(
                    f"the queue for `{call.model}` is full ({await self._bound(call.model)}"
                    "); retry later",
                    retry_after=self.settings.retry_after,
                ) from None
            if e.err_code == _JS_TOO_LARGE:
                raise PayloadTooLarge(
                    f"the request ({len(call.body)} bytes) is larger than the queue "
                    f"of `{call.model}` accepts"
                ) from None
            raise Unavailable(
                f"could not queue the request: {e.description}",
                retry_after=self.settings.retry_after,
            ) from e
        except NebulaError:
            raise
        except Exception as e:  # transient errors past the budget, connection closed
            raise Unavailable(
                f"NATS is not accepting requests: {type(e).__name__}",
                retry_after=self.settings.retry_after,
            ) from e

    async def _reconnected(self, call: Call) -> bool:
        """With several servers, wait (bounded) for the client to fail over to another."""
        if len(self.nc.servers) < 2:
            return False
        wait = min(self.nats_settings.retry_timeout, max(call.deadline - time.time(), 0.0))
        end = time.monotonic() + wait
        while time.monotonic() < end and not self.nc.is_closed:
            if self.nc.is_connected:
                return True
            await asyncio.sleep(0.05)
        return self.nc.is_connected

    async def _bound(self, model: str) -> str:
        """The model's queue bound as JetStream enforces it, for the 429's message."""
        try:
            cfg = (await self.js.stream_info(subjects.req_stream(model))).config
        except Exception:
            return "its bound is reached"
        return f"{cfg.max_msgs} requests or {cfg.max_bytes} bytes may wait"

    async def withdraw(self, call: Call) -> None:
        """Delete a job nobody started, so it is never run."""
        if call.seq:
            with contextlib.suppress(Exception):
                await self.js.delete_msg(subjects.req_stream(call.model), call.seq)

    async def requeue_unstarted(self) -> None:
        """After a reconnect: queue again every job NATS lost (memory storage dies with
        the server), so its client gets an answer instead of a misleading timeout."""
        for call in list(self.calls.values()):
            if call.done or call.worker_id is not None or call.failure is not None:
                continue
            if await self._still_queued(call):
                continue
            if call.done or call.worker_id is not None or call.request_id not in self.calls:
                continue  # started (or ended) while we looked
            log.warning("request %s was lost with NATS; queueing it again", call.request_id)
            self.metrics.count_requeued(call.model)
            try:
                await self.publish(call)
            except NebulaError as e:
                call.fail(e)

    async def taken(self, call: Call) -> str | None:
        """Whether the model's consumer has delivered the job (its sequence is at or
        below the last delivered one): ``"queued"`` if it is still in the work queue
        (the worker never acked it), ``"acked"`` if a worker acked it, None if not
        delivered (or unknown)."""
        if not call.seq:
            return None
        try:
            info = await self.js.consumer_info(
                subjects.req_stream(call.model), subjects.req_consumer(call.model), timeout=1.0
            )
        except Exception:
            return None
        if info.delivered is None or (info.delivered.stream_seq or 0) < call.seq:
            return None
        return "queued" if await self._still_queued(call) else "acked"

    async def _still_queued(self, call: Call) -> bool:
        try:
            msg = await self.js.get_msg(subjects.req_stream(call.model), call.seq)
        except Exception:
            return False
        return (msg.headers or {}).get(subjects.H_REQUEST_ID) == call.request_id
