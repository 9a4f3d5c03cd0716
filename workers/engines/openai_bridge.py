"""Bridge to any OpenAI-compatible server (vLLM, llama.cpp, Ollama, a cloud API).

Nothing is launched: jobs are forwarded over HTTP and the upstream's SSE chunks
come back as frames byte-for-byte. Fields Nebula does not know (``tools``,
``response_format``, vendor extensions) pass through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from nebula.errors import EngineError, Unavailable
from nebula.openai_types import Usage
from nebula.protocol import Endpoint
from nebula.settings import OpenAIUpstreamSettings
from workers.engines.base import EngineLoad, Job, Output

_PATHS = {
    Endpoint.CHAT: "/chat/completions",
    Endpoint.COMPLETION: "/completions",
    Endpoint.EMBEDDING: "/embeddings",
}


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: msgspec.Raw | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None


class ChunkProbe(msgspec.Struct):
    """Just enough of an upstream chunk to count tokens and find usage and errors."""

    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    error: msgspec.Raw | None = None

    def tokens(self) -> int:
        # Only chunks that carry output count: the worker sends the first counted
        # chunk at once, so a role-only opening chunk must not use up that flush.
        for c in self.choices:
            d = c.delta
            if c.text or (d is not None and (d.content or d.tool_calls or d.reasoning_content)):
                return 1
        return 0


def split_lines(buf: bytes) -> tuple[list[bytes], bytes]:
    *complete, rest = buf.split(b"\n")
    return complete, rest


class OpenAIEngine:
    kind = "openai"

    def __init__(self, settings: OpenAIUpstreamSettings, *, max_concurrency: int = 64) -> None:
        self.settings = settings
        self.owned_by = f"upstream {settings.url}"
        self._running = 0
        self._capacity = max_concurrency
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=settings.url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(settings.timeout, connect=10.0),
            limits=httpx.Limits(max_connections=max_concurrency + 8, max_keepalive_connections=64),
        )

    async def start(self) -> None:
        if not await self.health():
            raise Unavailable(f"upstream {self.settings.url} is not answering /models")

    async def health(self) -> bool:
        try:
            r = await self._client.get("/models", timeout=5.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def abort(self, request_id: str) -> None:
        return None  # cancelling the job closes its HTTP stream; vLLM aborts on disconnect

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running, capacity=self._capacity)

    async def stop(self) -> None:
        await self._client.aclose()

    def _request_body(self, job: Job) -> bytes:
        upstream_model = self.settings.upstream_model
        if not job.stream and (upstream_model is None or upstream_model == job.model):
            return job.body  # nothing to change: forward the client's bytes as they are
        body: dict[str, Any] = msgspec.json.decode(job.body)
        if upstream_model is not None:
            body["model"] = upstream_model
        if job.stream:
            # Always ask for usage so the fabric can account tokens; stripped below
            # when the client did not ask for it.
            opts = body.get("stream_options") or {}
            body["stream_options"] = {**opts, "include_usage": True}
        return msgspec.json.encode(body)

    def _renamer(self, job: Job) -> tuple[bytes, ...]:
        """Byte pairs that put the name the client asked for back into upstream answers."""
        upstream = self.settings.upstream_model
        if upstream is None or upstream == job.model:
            return ()
        theirs, ours = msgspec.json.encode(upstream), msgspec.json.encode(job.model)
        return (
            b'"model":' + theirs,
            b'"model":' + ours,
            b'"model": ' + theirs,
            b'"model": ' + ours,
        )

    async def generate(self, job: Job) -> AsyncIterator[Output]:
        path = _PATHS.get(job.endpoint)
        if path is None:
            raise EngineError(f"openai engine does not serve {job.endpoint.value}", status=400)
        content = self._request_body(job)
        # The request id travels on (vLLM, most proxies and their logs know X-Request-Id).
        headers = {"Content-Type": "application/json", "X-Request-Id": job.request_id}
        rename = self._renamer(job)

        def named(chunk: bytes) -> bytes:
            if rename:
                chunk = chunk.replace(rename[0], rename[1], 1).replace(rename[2], rename[3], 1)
            return chunk

        self._running += 1
        try:
            if not job.stream:
                try:
                    r = await self._client.post(path, content=content, headers=headers)
                except httpx.HTTPError as e:
                    raise EngineError(f"upstream request failed: {e!r}", status=502) from e
                if r.status_code >= 400:
                    raise EngineError(r.text, status=r.status_code, raw_body=r.content)
                if job.endpoint is Endpoint.EMBEDDING:  # nothing to count: pass it on
                    yield Output(chunk=named(r.content))
                    return
                probe = msgspec.json.decode(r.content, type=ChunkProbe)
                yield Output(chunk=named(r.content), usage=probe.usage)
                return
            try:
                async with self._client.stream("POST", path, content=content, headers=headers) as r:
                    if r.status_code >= 400:
                        raw = await r.aread()
                        raise EngineError(
                            raw.decode(errors="replace"), status=r.status_code, raw_body=raw
                        )
                    rest = b""
                    async for data in r.aiter_bytes():
                        lines, rest = split_lines(rest + data)
                        for line in lines:
                            if not line.startswith(b"data:"):
                                continue
                            chunk = line[5:].strip()
                            if chunk == b"[DONE]":
                                # Read on to the end of the body: a response left
                                # unfinished costs its keep-alive connection.
                                continue
                            probe = msgspec.json.decode(chunk, type=ChunkProbe)
                            if probe.error is not None:
                                raise EngineError("upstream error", status=502, raw_body=chunk)
                            if probe.usage is not None and not probe.choices:
                                # Usage was asked for on the client's behalf: pass it on
                                # only if the client asked too.
                                shown = named(chunk) if job.include_usage else b""
                                yield Output(chunk=shown, usage=probe.usage)
                                continue
                            yield Output(chunk=named(chunk), tokens=probe.tokens())
            except httpx.HTTPError as e:
                raise EngineError(f"upstream stream failed: {e!r}", status=502) from e
        finally:
            self._running -= 1
