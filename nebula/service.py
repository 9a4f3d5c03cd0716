"""The one shape of every long-lived Nebula object: ``async with X(...) as x``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)


class Service:
    """``__aenter__`` starts, ``__aexit__`` closes; ``close()`` must be safe to call twice."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            # A half-started service still holds what it opened (a NATS connection, its
            # tasks): release it, or the process cannot end cleanly. The start error is
            # the one to report, not a close of something half made.
            with contextlib.suppress(Exception):
                await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], grace: float = 5.0) -> None:
    """Cancel ``tasks`` and wait until they end; their errors are dropped (the tasks log
    their own). A task that swallows its cancellation (a loop that catches it inside a
    library call and goes on) is cancelled again every half second, and after ``grace``
    seconds left behind with a warning naming where it waits: a close never hangs on one.
    The caller's own cancellation still propagates."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            for t in pending:
                log.warning("a task ignored cancellation for %.0fs: %s", grace, await_chain(t))
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.5, left))
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" at exit


def await_chain(task: asyncio.Future[Any]) -> str:
    """Where a task waits: its coroutines, outermost first (``Task.print_stack`` shows only
    a suspended task's top frame)."""
    parts = [f"{task!r:.160}"]
    coro: Any = task.get_coro() if isinstance(task, asyncio.Task) else None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            parts.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(parts)
