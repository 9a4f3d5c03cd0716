"""The one shape of every long-lived Nebula object: ``async with X(...) as x``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """``__aenter__`` starts, ``__aexit__`` closes; ``close()`` must be safe to call twice."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
