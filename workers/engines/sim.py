"""SIMULATED engine: deterministic text with configurable latency.

For exercising the fabric and load benchmarks only; it never runs a model and
says so in ``owned_by``. Tokens are words; usage counts are exact in those units.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from collections.abc import AsyncIterator

import msgspec

from nebula.errors import InvalidRequest
from nebula.openai_types import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, Usage
from nebula.protocol import Endpoint
from nebula.settings import SimSettings
from workers.engines.base import EngineLoad, Job, Output

_VOCAB = (
    "the fabric moves tokens through queues while engines stay busy and every request "
    "finds a free slot on some worker so latency stays low and nothing waits forever "
    "nebula streams answers back over reply inboxes with start data keepalive end frames"
).split()
_enc = msgspec.json.encode
SIM_DIM = 8


def _count_words(value: object) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        return _count_words(value.get("text", ""))
    return 1 if isinstance(value, int) else 0


class SimEngine:
    kind = "sim"
    owned_by = "nebula (simulated engine)"

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self._running = 0
        self._slots = asyncio.Semaphore(settings.max_concurrency)

    async def start(self) -> None:
        return None

    async def health(self) -> bool:
        return True

    async def abort(self, request_id: str) -> None:
        return None  # generation is a coroutine: the worker's cancellation stops it

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running, capacity=self.settings.max_concurrency)

    async def stop(self) -> None:
        return None

    def _parse(self, job: Job) -> tuple[str, int, int, int | None]:
        """-> (seed text, prompt tokens, completion tokens, requested limit)."""
        try:
            if job.endpoint is Endpoint.CHAT:
                chat = msgspec.json.decode(job.body, type=ChatCompletionRequest)
                seed = "".join(str(m.content) for m in chat.messages)
                prompt = sum(_count_words(m.content) + 1 for m in chat.messages)
                limit = chat.limit()
            else:
                comp = msgspec.json.decode(job.body, type=CompletionRequest)
                seed, prompt, limit = str(comp.prompt), _count_words(comp.prompt), comp.max_tokens
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InvalidRequest(f"invalid request: {e}") from None
        if (chat.n if job.endpoint is Endpoint.CHAT else comp.n) > 1:
            raise InvalidRequest("the sim engine answers with one choice: n must be 1", param="n")
        n = limit if limit is not None else self.settings.max_tokens
        return seed, prompt, n, limit

    async def generate(self, job: Job) -> AsyncIterator[Output]:
        if job.endpoint is Endpoint.EMBEDDING:
            yield await self._embed(job)
            return
        seed, prompt_tokens, n, limit = self._parse(job)
        finish = "length" if limit is not None else "stop"
        start = zlib.crc32(seed.encode()) % len(_VOCAB)
        # Lazily: memory stays constant whatever max_tokens a client asks for.
        words = ((" " if i else "") + _VOCAB[(start + i * 7) % len(_VOCAB)] for i in range(n))
        usage = Usage(
            prompt_tokens=prompt_tokens, completion_tokens=n, total_tokens=prompt_tokens + n
        )
        chat = job.endpoint is Endpoint.CHAT
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        ttft, itl = self.settings.ttft_ms / 1000, self.settings.itl_ms / 1000

        async with self._slots:
            self._running += 1
            try:
                if ttft:
                    await asyncio.sleep(ttft)
                if not job.stream:
                    # A real engine still spends the inter-token time generating.
                    if itl and n > 1:
                        await asyncio.sleep(itl * (n - 1))
                    yield Output(
                        chunk=_full(chat, rid, created, job.model, "".join(words), finish, usage),
                        tokens=n,
                        usage=usage,
                    )
                    return
                head, tail = _chunk_frame(chat, rid, created, job.model)
                if chat:  # OpenAI opens a chat stream with the assistant role
                    yield Output(chunk=head + b'{"role":"assistant","content":""}' + tail)
                for i, w in enumerate(words):
                    if i:
                        if itl:
                            await asyncio.sleep(itl)
                        elif i % 64 == 0:
                            await asyncio.sleep(0)  # let other requests run on long streams
                    piece = b'{"content":' + _enc(w) + b"}" if chat else _enc(w)
                    yield Output(chunk=head + piece + tail, tokens=1)
                last = b"{}" if chat else b'""'
                final_tail = b',"logprobs":null,"finish_reason":' + _enc(finish) + b"}]}"
                yield Output(chunk=head + last + final_tail, usage=usage)
                if job.include_usage:
                    yield Output(chunk=_usage_chunk(chat, rid, created, job.model, usage))
            finally:
                self._running -= 1

    async def _embed(self, job: Job) -> Output:
        """Deterministic unit vectors (SIM_DIM floats from each text's CRC): exercises
        the fabric's embedding and batch paths without a model."""
        try:
            req = msgspec.json.decode(job.body, type=EmbeddingRequest)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InvalidRequest(f"invalid embeddings request: {e}", param="input") from None
        texts = req.texts()
        if not texts:
            raise InvalidRequest("input must be non-empty text", param="input")
        async with self._slots:
            self._running += 1
            try:
                if self.settings.ttft_ms:
                    await asyncio.sleep(self.settings.ttft_ms / 1000)
            finally:
                self._running -= 1
        data = []
        tokens = 0
        for i, text in enumerate(texts):
            raw = [
                ((zlib.crc32(f"{k}:{text}".encode()) % 2001) - 1000) / 1000 for k in range(SIM_DIM)
            ]
            norm = sum(x * x for x in raw) ** 0.5 or 1.0
            data.append({"object": "embedding", "index": i, "embedding": [x / norm for x in raw]})
            tokens += max(1, len(text.split()))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        body = {"object": "list", "data": data, "model": job.model, "usage": usage}
        return Output(chunk=_enc(body))


def _chunk_frame(chat: bool, rid: str, created: int, model: str) -> tuple[bytes, bytes]:
    """The bytes around one chunk's delta (chat) or text (completion)."""
    obj = b"chat.completion.chunk" if chat else b"text_completion"
    head = (
        b'{"id":"'
        + rid.encode()
        + b'","object":"'
        + obj
        + b'","created":'
        + str(created).encode()
        + b',"model":'
        + _enc(model)
        + (b',"choices":[{"index":0,"delta":' if chat else b',"choices":[{"index":0,"text":')
    )
    tail = b',"logprobs":null,"finish_reason":null}]}'
    return head, tail


def _usage_chunk(chat: bool, rid: str, created: int, model: str, usage: Usage) -> bytes:
    return _enc(
        {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )


def _full(
    chat: bool, rid: str, created: int, model: str, text: str, finish: str, usage: Usage
) -> bytes:
    choice: dict[str, object] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if chat:
        # The official schema's message always carries `refusal` (null unless refused).
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    return _enc(
        {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    )
