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
from collections.abc import AsyncIterator

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from gateway.registry import ModelRegistry
from nebula import natsio, subjects
from nebula.errors import (
    DeadlineExceeded,
    NebulaError,
    NoReplica,
    QueueFull,
    Unavailable,
    WorkerLost,
    error_from_wire,
)
from nebula.protocol import Endpoint, FrameKind
from nebula.settings import GatewaySettings, NatsSettings

log = logging.getLogger(__name__)

_JS_MAX_MSGS_PER_SUBJECT = 10077  # "maximum messages per subject exceeded"
_JS_MAX_MSGS = 10054
_START = FrameKind.START.value
_DATA = FrameKind.DATA.value
_END = FrameKind.END.value
_ERROR = FrameKind.ERROR.value
_KEEPALIVE = FrameKind.KEEPALIVE.value


class Call:
    """One request in flight: its frames arrive on ``queue``."""

    __slots__ = (
        "attempt",
        "body",
        "deadline",
        "delivered",
        "dispatcher",
        "done",
        "endpoint",
        "model",
        "queue",
        "request_id",
        "seq",
        "worker_id",
    )

    def __init__(
        self, dispatcher: Dispatcher, model: str, endpoint: Endpoint, body: bytes, deadline: float
    ) -> None:
        self.dispatcher = dispatcher
        self.request_id = uuid.uuid4().hex
        self.model = model
        self.endpoint = endpoint
        self.body = body
        self.deadline = deadline
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.worker_id: str | None = None
        self.attempt = 0
        self.seq = 0  # stream sequence of the queued job, to withdraw it
        self.delivered = False  # has any answer byte reached the client?
        self.done = False

    async def _next(self, timeout: float) -> Msg:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.queue.get()
                wid = (msg.headers or {}).get(subjects.H_WORKER)
                # After a retry, frames from the worker we gave up on are stale.
                if self.worker_id is None or wid == self.worker_id:
                    return msg

    async def wait_started(self) -> None:
        """Until a worker sends ``start``; 503/504 when none does before the deadline."""
        d = self.dispatcher
        while True:
            remaining = self.deadline - time.time() + 0.5  # the worker's own 504 wins ties
            try:
                msg = await self._next(max(remaining, 0.0))
            except TimeoutError:
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
            kind = msg.headers.get(subjects.H_KIND) if msg.headers else None
            if kind == _START:
                self.worker_id = msg.headers[subjects.H_WORKER]  # type: ignore[index]
                return
            if kind == _ERROR:
                raise _wire_error(msg)

    async def frames(self) -> AsyncIterator[tuple[str, bytes]]:
        """(kind, body) of data/end frames after start, retrying once on a silent worker."""
        timeout = self.dispatcher.settings.keepalive_timeout
        while True:
            try:
                msg = await self._next(timeout)
            except TimeoutError:
                if self.delivered or self.attempt >= 2:
                    raise WorkerLost(
                        f"worker {self.worker_id} serving `{self.model}` went silent "
                        f"for {timeout:.0f}s"
                    ) from None
                log.warning("worker %s silent; re-queueing %s", self.worker_id, self.request_id)
                self.worker_id = None
                self.deadline = time.time() + self.dispatcher.settings.dispatch_timeout
                await self.dispatcher.publish(self)
                await self.wait_started()
                continue
            kind = msg.headers.get(subjects.H_KIND) if msg.headers else None
            if kind == _KEEPALIVE or kind == _START:
                continue
            if kind == _ERROR:
                raise _wire_error(msg)
            yield kind or _DATA, msg.data
            if kind == _END:
                self.done = True
                return

    async def cancel(self) -> None:
        """The client went away: withdraw the queued job or stop the worker running it."""
        if self.done:
            return
        self.done = True
        if self.worker_id is not None:
            with contextlib.suppress(Exception):
                await self.dispatcher.nc.publish(
                    subjects.cancel_subject(self.worker_id), self.request_id.encode()
                )
        else:
            await self.dispatcher.withdraw(self)

    def close(self) -> None:
        self.dispatcher.calls.pop(self.request_id, None)


def _wire_error(msg: Msg) -> NebulaError:
    status = int((msg.headers or {}).get(subjects.H_STATUS, "500"))
    return error_from_wire(status, msg.data)


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        settings: GatewaySettings,
        nats_settings: NatsSettings,
        registry: ModelRegistry,
        gateway_id: str,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.nats_settings = nats_settings
        self.registry = registry
        self.gateway_id = gateway_id
        self.calls: dict[str, Call] = {}
        self._prefix_len = len(subjects.reply_prefix(gateway_id)) + 1
        self._sub: Subscription | None = None

    async def start(self) -> None:
        await self.ensure_stream()
        self._sub = await self.nc.subscribe(
            subjects.reply_wildcard(self.gateway_id), cb=self._on_reply, pending_msgs_limit=-1
        )

    async def ensure_stream(self) -> None:
        await natsio.ensure_request_stream(
            self.js, self.nats_settings, max_queue=self.settings.max_queue
        )

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        call = self.calls.get(msg.subject[self._prefix_len :])
        if call is not None:
            call.queue.put_nowait(msg)

    async def submit(self, model: str, endpoint: Endpoint, body: bytes) -> Call:
        deadline = time.time() + self.settings.dispatch_timeout
        call = Call(self, model, endpoint, body, deadline)
        self.calls[call.request_id] = call
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
        }
        subject = subjects.req_subject(call.model)
        if not self.nc.is_connected:
            # Fail fast while NATS is away: the client can retry, nothing waits blind.
            raise Unavailable(
                "the message broker is unreachable; retry shortly",
                retry_after=self.settings.retry_after,
            )
        for retry in (True, False):
            try:
                ack = await self.js.publish(subject, call.body, headers=headers, timeout=5.0)
                call.seq = ack.seq
                return
            except APIError as e:
                if e.err_code in (_JS_MAX_MSGS_PER_SUBJECT, _JS_MAX_MSGS):
                    raise QueueFull(
                        f"the queue for `{call.model}` is full "
                        f"({self.settings.max_queue} waiting); retry later",
                        retry_after=self.settings.retry_after,
                    ) from None
                raise Unavailable(f"could not queue the request: {e.description}") from e
            except (NoRespondersError, NatsTimeout) as e:
                # The memory stream is gone (NATS restarted): make it again, once.
                if retry and self.nc.is_connected:
                    with contextlib.suppress(Exception):
                        await self.ensure_stream()
                    continue
                raise Unavailable(f"NATS is not accepting requests: {type(e).__name__}") from e

    async def withdraw(self, call: Call) -> None:
        """Delete a job nobody started, so it is never run."""
        if call.seq:
            with contextlib.suppress(Exception):
                await self.js.delete_msg(subjects.REQ_STREAM, call.seq)
