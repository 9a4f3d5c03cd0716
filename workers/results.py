"""Batch results out: JetStream publishes whose acks are collected, not waited in turn.

``js.publish`` is a request per result (a fresh future, a timer, a JSON parse of the
ack) awaited one after another by each item's task. Here every result is a plain
publish with a reply subject under ONE wildcard inbox of this worker; the server's
acks come back there and resolve the futures, so a job message of many items sends
all its results at once and is acked when the last one is stored. An ack that never
comes (NATS restarted, a leader election) fails its future after ``timeout``: the
item is then not acked, JetStream hands it out again, and the rerun's result
replaces nothing (one message per result subject). nats-py's own ``js.publish_async``
does the first part, but its futures have no deadline and are not failed on a
reconnect: an ack lost in a NATS restart would hold its item (and a pending slot)
for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nebula.errors import Unavailable


class ResultPublisher:
    """``fut = await pub.publish(subject, body, headers)``; ``await fut`` once stored."""

    def __init__(self, nc: Client, *, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._cut = 0
        self._sub: Subscription | None = None
        self._n = 0
        # token -> (deadline, future), oldest first (deadlines only grow).
        self._pending: OrderedDict[str, tuple[float, asyncio.Future[None]]] = OrderedDict()

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox()
        self._cut = len(self._prefix) + 1
        self._sub = await self.nc.subscribe(
            f"{self._prefix}.*", cb=self._on_ack, pending_msgs_limit=-1
        )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str]
    ) -> asyncio.Future[None]:
        self._n += 1
        token = format(self._n, "x")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[token] = (time.monotonic() + self.timeout, fut)
        try:
            await self.nc.publish(subject, body, reply=f"{self._prefix}.{token}", headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return fut

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[self._cut :], None)
        if entry is None or entry[1].done():
            return
        data = msg.data
        # A stored result acks {"stream": ..., "seq": ...}; an error says "error", and
        # no stream at all is an empty 503 status message.
        if not data or b'"error"' in data:
            status = (msg.headers or {}).get("Status", "")
            why = data.decode(errors="replace") if data else f"status {status or '?'}"
            entry[1].set_exception(Unavailable(f"result not stored: {why}"))
        else:
            entry[1].set_result(None)

    def expire(self, now: float | None = None) -> None:
        """Fail publishes whose ack is overdue (call now and then)."""
        now = time.monotonic() if now is None else now
        while self._pending:
            token, (deadline, fut) = next(iter(self._pending.items()))
            if deadline > now:
                return
            del self._pending[token]
            if not fut.done():
                fut.set_exception(TimeoutError("no ack for a stored result"))

    def fail_all(self, why: str) -> None:
        """Acks in flight may be lost (the connection dropped): fail them now, so their
        items rerun at once instead of after ``timeout``."""
        pending, self._pending = self._pending, OrderedDict()
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(why))

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.fail_all("the worker stopped")
