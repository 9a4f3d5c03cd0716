"""Bridge to any OpenAI-compatible server (vLLM, llama.cpp, Ollama, a cloud API).

Nothing is launched: jobs are forwarded over HTTP and the upstream's SSE chunks
come back as frames byte-for-byte. Fields Nebula does not know (``tools``,
``response_format``, vendor extensions) pass through untouched.

Lean on purpose (the whole path shares cores with the upstream on small machines):
keep-alive connections from :mod:`workers.engines.upstream`, the client's body
forwarded as it came where nothing needs changing, and each SSE event's JSON read
only through a small typed probe (token count, usage, error), never re-encoded.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from nebula.errors import EngineError, Unavailable
from nebula.openai_types import Usage
from nebula.protocol import Endpoint
from nebula.settings import OpenAIUpstreamSettings
from workers.engines.base import EngineLoad, Job, Output
from workers.engines.upstream import Connection, Pool

_PATHS = {
    Endpoint.CHAT: b"/chat/completions",
    Endpoint.COMPLETION: b"/completions",
    Endpoint.EMBEDDING: b"/embeddings",
}


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[msgspec.Raw] | None = None  # (msgspec.Raw | None decodes null only)
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


_SAFE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,200}").fullmatch
_probe = msgspec.json.Decoder(ChunkProbe)


def split_lines(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines of an SSE body, and the partial line that follows them."""
    *complete, rest = buf.split(b"\n")
    return complete, rest


def with_refusal(body: bytes) -> bytes:
    """The official schema's chat ``message`` always carries ``refusal`` (null when none):
    added where an upstream leaves it out. Upstreams that send it (vLLM) cost one scan."""
    if b'"refusal"' in body:
        return body
    try:
        full = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    choices = full.get("choices") if isinstance(full, dict) else None
    changed = False
    for choice in choices if isinstance(choices, list) else ():
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict) and "refusal" not in msg:
            msg["refusal"] = None
            changed = True
    return msgspec.json.encode(full) if changed else body


class OpenAIEngine:
    kind = "openai"

    def __init__(self, settings: OpenAIUpstreamSettings, *, max_concurrency: int = 64) -> None:
        self.settings = settings
        self.owned_by = f"upstream {settings.url}"
        self._running = 0
        self._capacity = max_concurrency
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._pool = Pool(settings.url, headers=headers, max_idle=max_concurrency + 8)
        self._timeout = settings.timeout
        self._models = self._pool.build(b"GET", b"/models")

    async def start(self) -> None:
        if not await self.health():
            raise Unavailable(f"upstream {self.settings.url} is not answering /models")

    async def health(self) -> bool:
        try:
            status, _ = await self._exchange(self._models, timeout=5.0)
        except (OSError, TimeoutError):
            return False
        return status == 200

    async def abort(self, request_id: str) -> None:
        return None  # cancelling the job closes its connection; vLLM aborts on disconnect

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running, capacity=self._capacity)

    async def stop(self) -> None:
        await self._pool.close()

    async def _exchange(self, request: bytes, timeout: float) -> tuple[int, bytes]:
        """One whole request/response (non-streaming)."""
        conn = await self._pool.request(request, timeout)
        try:
            return conn.status, await conn.read_all(timeout)
        finally:
            self._pool.release(conn)

    def _request_body(self, job: Job) -> bytes:
        upstream_model = self.settings.upstream_model
        rename = upstream_model is not None and upstream_model != job.model
        if not job.stream and not rename:
            return job.body  # nothing to change: forward the client's bytes as they are
        body = job.body
        if not rename and b'"stream_options"' not in body:
            # Only usage to ask for (the fabric accounts tokens; the usage chunk is
            # dropped below unless the client asked too): splice it in, no re-encoding.
            end = body.rstrip().rfind(b"}")
            if end > 0:
                sep = b"," if body[:end].rstrip()[-1:] not in (b"{", b"") else b""
                return body[:end] + sep + b'"stream_options":{"include_usage":true}}'
        doc: dict[str, Any] = msgspec.json.decode(body)
        if rename:
            doc["model"] = upstream_model
        if job.stream:
            opts = doc.get("stream_options") or {}
            doc["stream_options"] = {**opts, "include_usage": True}
        return msgspec.json.encode(doc)

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
        # The request id travels on (vLLM, most proxies and their logs know X-Request-Id);
        # ids with anything but plain characters are not sent (no header injection).
        rid = job.request_id
        extra = b"X-Request-Id: " + rid.encode() + b"\r\n" if _SAFE_ID(rid) else b""
        request = self._pool.build(b"POST", path, self._request_body(job), extra)
        rename = self._renamer(job)

        def named(chunk: bytes) -> bytes:
            if rename:
                chunk = chunk.replace(rename[0], rename[1], 1).replace(rename[2], rename[3], 1)
            return chunk

        timeout = self._timeout
        self._running += 1
        conn: Connection | None = None
        try:
            try:
                conn = await self._pool.request(request, timeout)
                if conn.status >= 400 or not job.stream:
                    raw = await conn.read_all(timeout)
            except (OSError, TimeoutError) as e:
                raise EngineError(f"upstream request failed: {e}", status=502) from e
            if conn.status >= 400:
                raise EngineError(raw.decode(errors="replace"), status=conn.status, raw_body=raw)
            if not job.stream:
                if job.endpoint is Endpoint.EMBEDDING:  # nothing to count: pass it on
                    yield Output(chunk=named(raw))
                    return
                if job.endpoint is Endpoint.CHAT:
                    raw = with_refusal(raw)
                try:
                    probe = _probe.decode(raw)
                except msgspec.DecodeError as e:
                    raise EngineError(f"upstream sent a bad answer: {e}", status=502) from e
                yield Output(chunk=named(raw), usage=probe.usage)
                return
            rest = b""
            while True:
                try:
                    data = await conn.read(timeout)
                except (OSError, TimeoutError) as e:
                    raise EngineError(f"upstream stream failed: {e}", status=502) from e
                if data is None:
                    if not rest:
                        break
                    data, rest = rest + b"\n", b""  # a last event without its newline
                elif rest:
                    data, rest = rest + data, b""
                lines = data.split(b"\n")
                rest = lines.pop()
                # What arrived in one read goes on as one framed Output (whole SSE
                # events): one turn of the worker per read, not per chunk.
                out: list[bytes] = []
                tokens = 0
                usage = None
                for line in lines:
                    if line[:5] != b"data:":
                        continue  # blank separators, comments, event names
                    chunk = line[5:].strip()
                    if chunk == b"[DONE]":
                        # Read on to the end of the body: a response left unfinished
                        # costs its keep-alive connection.
                        continue
                    try:
                        probe = _probe.decode(chunk)
                    except msgspec.DecodeError as e:
                        raise EngineError(f"upstream sent a bad event: {e}", status=502) from e
                    if probe.error is not None:
                        if out:
                            yield Output(b"".join(out), tokens=tokens, usage=usage, framed=True)
                        raise EngineError("upstream error", status=502, raw_body=chunk)
                    if probe.usage is not None and not probe.choices:
                        # Usage was asked for on the client's behalf: pass it on only
                        # if the client asked too.
                        usage = probe.usage
                        if not job.include_usage:
                            continue
                    else:
                        tokens += probe.tokens()
                    out += (b"data: ", named(chunk), b"\n\n")
                if out or usage is not None:
                    yield Output(b"".join(out), tokens=tokens, usage=usage, framed=True)
        finally:
            self._running -= 1
            if conn is not None:
                # A finished response keeps its connection; anything else (the client
                # left, an error) closes it, which is how the upstream learns to abort.
                self._pool.release(conn)
