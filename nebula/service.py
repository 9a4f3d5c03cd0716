"""The one shape of every long-lived Nebula object: ``async with X(...) as x``."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Self


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
