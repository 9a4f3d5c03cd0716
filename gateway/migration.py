"""Request migration: continue a stream on another replica after its worker died.

Opt-in per model (``ModelSpec.migrate``, the most continuations per request). The
gateway keeps the text a stream has delivered so far; when the worker goes silent
after tokens reached the client, it queues a continuation (the prompt plus that
text, as a final assistant message vLLM continues with ``continue_final_message``,
or the completion prompt with the text appended) and splices the new attempt's
chunks into the same SSE stream: same chunk id and ``created``, no second role
chunk, the output limit reduced by what was already sent. Never for requests whose
continuation would not be the same answer: guided decoding, tools, logprobs,
``n`` > 1, ``echo``, token-id prompts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from nebula.protocol import Endpoint

# A continuation could not honour these: the whole answer is constrained or scored.
_NOT_MIGRATABLE = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "tools",
    "tool_choice",
    "functions",
    "logprobs",
    "top_logprobs",
    "echo",
    "prompt_logprobs",
)


class Migration:
    """What a stream delivered so far, and how to ask another replica for the rest."""

    def __init__(self, endpoint: Endpoint, request: dict[str, Any], budget: int) -> None:
        self.endpoint = endpoint
        self.request = request
        self.budget = budget  # continuations left
        self.text: list[str] = []
        self.chunks = 0  # content chunks delivered (each carries at least one token)
        self.chunk_id: str | None = None
        self.created: int | None = None
        self.continuing = False  # frames now come from a continuation
        self.carried = 0  # chunks delivered before the current continuation

    @classmethod
    def for_request(cls, endpoint: Endpoint, body: bytes, budget: int) -> Migration | None:
        """A tracker when this request may migrate, else None."""
        if budget <= 0 or endpoint not in (Endpoint.CHAT, Endpoint.COMPLETION):
            return None
        try:
            request = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        if not isinstance(request, dict) or not request.get("stream"):
            return None
        if (request.get("n") or 1) != 1 or any(
            request.get(k) not in (None, False) for k in _NOT_MIGRATABLE
        ):
            return None
        if endpoint is Endpoint.COMPLETION and not isinstance(request.get("prompt"), str):
            return None
        if endpoint is Endpoint.CHAT and not isinstance(request.get("messages"), list):
            return None
        return cls(endpoint, request, budget)

    def relay(self, data: bytes) -> bytes:
        """Note what a data/end frame delivers; on a continuation, rewrite its chunks
        so the client sees one stream. Returns the bytes to send."""
        out: list[bytes] = []
        for event in data.split(b"\n\n"):
            if not event.strip():
                continue
            if not event.startswith(b"data: {"):
                out.append(event + b"\n\n")  # [DONE] and anything we do not parse
                continue
            try:
                chunk = msgspec.json.decode(event[6:])
            except msgspec.DecodeError:
                out.append(event + b"\n\n")
                continue
            keep = self._observe(chunk)
            if not self.continuing:
                out.append(event + b"\n\n")
            elif keep:
                chunk["id"], chunk["created"] = self.chunk_id, self.created
                self._fix_usage(chunk.get("usage"))
                out.append(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
        return b"".join(out)

    def _observe(self, chunk: Any) -> bool:
        """Record a chunk's text; False for a continuation's opening role chunk."""
        if not isinstance(chunk, dict):
            return True
        if self.chunk_id is None:
            self.chunk_id, self.created = chunk.get("id"), chunk.get("created")
        choices = chunk.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return True
        choice = choices[0]
        if self.endpoint is Endpoint.CHAT:
            delta = choice.get("delta") or {}
            piece = delta.get("content") or ""
            opening = "role" in delta and not piece and not choice.get("finish_reason")
            if opening and self.continuing:
                return False
        else:
            piece = choice.get("text") or ""
        if piece:
            self.text.append(piece)
            self.chunks += 1
        return True

    def _fix_usage(self, usage: Any) -> None:
        """The continuation counted the carried text as prompt: count it as output
        again (one token per delivered chunk: exact for one-token chunks, close else)."""
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            usage["prompt_tokens"] = max(prompt - self.carried, 0)
            usage["completion_tokens"] = completion + self.carried
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

    def continuation(self) -> bytes | None:
        """The request that asks for the rest of the answer; None when nothing is left
        to ask for (no continuations left, or the output limit already reached)."""
        if self.budget <= 0:
            return None
        req = dict(self.request)
        so_far = "".join(self.text)
        for key in ("max_tokens", "max_completion_tokens"):
            limit = req.get(key)
            if isinstance(limit, int):
                if limit - self.chunks < 1:
                    return None
                req[key] = limit - self.chunks
        if self.endpoint is Endpoint.CHAT:
            req["messages"] = [*req["messages"], {"role": "assistant", "content": so_far}]
            # vLLM: continue the last assistant message instead of starting a new one.
            req["continue_final_message"] = True
            req["add_generation_prompt"] = False
        else:
            req["prompt"] = req["prompt"] + so_far
        self.budget -= 1
        self.continuing = True
        self.carried = self.chunks
        return msgspec.json.encode(req)
