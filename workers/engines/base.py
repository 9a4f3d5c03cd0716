"""The engine protocol every engine kind implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from nebula.openai_types import Usage
from nebula.protocol import Endpoint


@dataclass(frozen=True, slots=True)
class Job:
    request_id: str
    model: str
    endpoint: Endpoint
    body: bytes  # the client's JSON body, untouched
    stream: bool
    include_usage: bool
    # 0: interactive; 1: a batch-job item (engines that batch serve it after interactive work).
    priority: int = 0


@dataclass(slots=True)
class Output:
    """One piece of an answer, already in OpenAI JSON.

    Streaming: ``chunk`` is one ``*.chunk`` object (or the usage-only chunk).
    Not streaming: a single Output whose ``chunk`` is the whole response.
    """

    chunk: bytes
    tokens: int = 0
    usage: Usage | None = None
    # ``chunk`` is already one or more whole SSE events (``data: ...\n\n``), passed on
    # as they are: an engine that gets SSE from its server saves a split and re-frame.
    framed: bool = False


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: int
    waiting: int = 0
    capacity: int = 0
    kv_cache_usage: float = 0.0  # fraction of the engine's KV cache in use (0 if it has none)


class Engine(Protocol):
    kind: str
    owned_by: str

    async def start(self) -> None: ...

    async def health(self) -> bool: ...

    def generate(self, job: Job) -> AsyncIterator[Output]: ...

    async def abort(self, request_id: str) -> None: ...

    def load(self) -> EngineLoad: ...

    async def stop(self) -> None: ...


@runtime_checkable
class AdapterHost(Protocol):
    """An engine that serves LoRA adapters, each under its own model name."""

    adapters: dict[str, str]  # loaded now: name -> path

    async def set_adapters(self, wanted: Mapping[str, str]) -> None:
        """Load and unload until exactly ``wanted`` is loaded."""
        ...
